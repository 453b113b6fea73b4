"""Device agent: MQTT client, trainer, encrypt + sign + publish, key-share duty, local combine (DESIGN §7)."""
