"""Head-end ingest: the MQTT stream of reading batches validated, aggregated and stored.

Laid out by what things are (``docs/architecture.md`` says where new code goes):

* :mod:`ingest.mqtt` -- the MQTT adapter: manual-ack consumer, PUBACK-awaiting publisher;
* :mod:`ingest.rules` -- validation, estimation and aggregation: numba kernels
  (:mod:`~ingest.rules.kernels`) and their checking wrappers (:mod:`~ingest.rules.stages`);
* :mod:`ingest.model` -- domain data: the meter registry, the tariff and time-of-use model;
* :mod:`ingest.pipeline` -- the worker, the pure per-batch transform and the durable state
  (dedup, loss account, dead letters, replay);
* :mod:`ingest.sinks` -- where the results are stored (InfluxDB: line protocol, HTTP, queries);
* :mod:`ingest.reports` -- jobs over stored data (the daily line-loss and collection report);
* :mod:`ingest.feectl` -- the prepaid fee-control service;
* :mod:`ingest.ops` -- the ops HTTP API (aiohttp.web), hosted by the fee-control service;
* :mod:`ingest.broker` -- the shipped mosquitto configuration and ACL;
* :mod:`ingest.cli`, :mod:`ingest.config`, :mod:`ingest.metrics` -- ``amigw ingest``, its one
  configuration loader, its Prometheus metrics.

Importing a kernel module imports neither paho-mqtt nor an HTTP client.
"""
