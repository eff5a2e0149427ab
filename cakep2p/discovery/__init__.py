"""Zero-configuration discovery: nodes announce themselves over mDNS/DNS-SD with what they offer, and keep a live
directory of their peers.

- service.py: announcing and browsing (python-zeroconf), with TTL refresh and expiry
- directory.py: the live peers, with listeners
- records.py: PeerInfo and its TXT record
- capacity.py: what this machine can contribute (memory, accelerator, a cached speed benchmark)
- identity.py: this install's node id and default name
"""

from cakep2p.discovery.directory import STATIC_KEY, PeerDirectory
from cakep2p.discovery.records import PeerInfo
from cakep2p.discovery.service import SERVICE_TYPE, Discovery, mdns_ttl, snapshot_peers

__all__ = ["SERVICE_TYPE", "STATIC_KEY", "Discovery", "PeerDirectory", "PeerInfo", "mdns_ttl", "snapshot_peers"]
