"""The alert receiver: webhook, payload validation, alert store, outbox relay, events, Pulsar publisher."""
