"""The MQTT adapter of the head-end: :mod:`~ingest.mqtt.consumer`, the manual-ack,
persistent-session consumer."""
