"""The MQTT adapter of the head-end, shared by the ingest workers and fee control:
:mod:`~ingest.mqtt.settings` (the connection settings, one dataclass),
:mod:`~ingest.mqtt.consumer` (the manual-ack, persistent-session consumer) and
:mod:`~ingest.mqtt.publisher` (the PUBACK-awaiting publisher)."""
