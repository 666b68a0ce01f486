"""The sync discovery channel's public names, importable from here as before; the
code is in ``discovery_core.client`` (``sync`` for the channel itself)."""

from discovery_core.client.errors import NoInstanceError
from discovery_core.client.picker import Picker
from discovery_core.client.retry import RetryPolicy
from discovery_core.client.sync import DiscoveryChannel, discovery_channel

__all__ = ["DiscoveryChannel", "NoInstanceError", "Picker", "RetryPolicy", "discovery_channel"]
