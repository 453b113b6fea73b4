"""The gateway as a Sparkplug B edge node (docs/sparkplug.md): payloads in :mod:`.payload`, the MQTT session
with its births, deaths and sequence numbers in :mod:`.node`."""
