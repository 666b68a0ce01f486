"""discovery-core's examples, installed as ``discovery_examples`` (the demo uses them)."""
