"""Fleet provisioning: key dealing, enrollment, sealed secrets, service install (DESIGN §8)."""
