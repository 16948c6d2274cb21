"""loadgen: replays request arrivals and spot-availability traces against a spotserve cluster
over NATS, under the SpotServe policy and its baselines, and reports latency and cost."""
