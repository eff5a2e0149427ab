"""What a cakep2p mDNS announcement says: PeerInfo and its compact TXT record (encode, parse, validate)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from cakep2p import PROTOCOL_VERSION
from cakep2p.network import pick_address

MAX_TXT_BYTES = 1300                   # ours is ~300; anything near an Ethernet frame is not from cakep2p
# TXT keys: id node id, pv protocol, v version, cf cluster fingerprint, rt/ra RAM total/available, vt/vf VRAM
# total/free, ac accelerator, dn device, om offered bytes, gf GFLOP/s, bw bytes/s, sv serving, p mesh port, t start ms
REQUIRED_KEYS = ("id", "pv", "v", "cf", "rt", "ra", "vt", "vf", "ac", "dn", "om", "gf", "bw", "sv", "p", "t")
MAX_NAME_CHARS = 63                    # a DNS label; longer instance names are not ours
TEXT_LIMITS = {"v": 32, "cf": 64, "ac": 16, "dn": 96}   # what encode_txt sends at most; these reach logs and tables

Status = Literal["ok", "other_cluster", "incompatible"]


@dataclass(frozen=True)
class PeerInfo:
    name: str
    node_id: str
    address: str
    port: int
    version: str
    protocol_version: int
    cluster_fingerprint: str
    accelerator: str
    device_name: str
    ram_total: int
    ram_available: int
    vram_total: int
    vram_free: int
    offered_memory: int
    gflops: float
    bandwidth: float
    serving: bool
    status: Status = "ok"
    addresses: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """The object `cakep2p peers --json` prints."""
        data = asdict(self)
        data["id"] = data.pop("node_id")
        data["addresses"] = list(self.addresses)
        data["cluster_ok"] = self.status != "other_cluster"
        return data


# ---- TXT records ---------------------------------------------------------------------------------------------

def encode_txt(info: PeerInfo, started_at_ms: int) -> dict[str, str]:
    """Compact TXT properties for our announcement (each value well under 255 bytes)."""
    return {
        "id": info.node_id, "pv": str(info.protocol_version), "v": info.version[:32],
        "cf": info.cluster_fingerprint[:64], "rt": str(info.ram_total), "ra": str(info.ram_available),
        "vt": str(info.vram_total), "vf": str(info.vram_free), "ac": info.accelerator[:16],
        "dn": info.device_name[:96], "om": str(info.offered_memory), "gf": f"{info.gflops:.2f}",
        "bw": f"{info.bandwidth:.0f}", "sv": "1" if info.serving else "0", "p": str(info.port),
        "t": str(started_at_ms),
    }


def parse_txt(raw: bytes) -> dict[str, str]:
    """DNS-SD TXT wire bytes -> {key: value}; ValueError on anything malformed (lengths, non-UTF-8, size)."""
    if len(raw) > MAX_TXT_BYTES:
        raise ValueError(f"TXT record of {len(raw)} bytes is too large")
    properties: dict[str, str] = {}
    position = 0
    while position < len(raw):
        length = raw[position]
        entry = raw[position + 1:position + 1 + length]
        if len(entry) != length:
            raise ValueError("TXT entry runs past the end of the record")
        position += 1 + length
        key, _, value = entry.decode("utf-8").partition("=")   # UnicodeDecodeError is a ValueError
        if key:
            properties.setdefault(key.lower(), value)
    return properties


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"{text!r} is out of range")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1e30:
        raise ValueError(f"{text!r} is out of range")
    return value


def _check_text(what: str, value: str, limit: int) -> None:
    """ValueError unless a text field from another machine is printable (no newlines, escapes) and short."""
    if len(value) > limit or not value.isprintable():
        raise ValueError(f"{what} {value[:limit]!r} is not printable text of at most {limit} characters")


def peer_from_txt(name: str, properties: dict[str, str], addresses: list[str], srv_port: int,
                  cluster_fingerprint: str) -> tuple[PeerInfo, int]:
    """(PeerInfo, start time in ms) from parsed TXT; ValueError/KeyError when it is not a cakep2p record."""
    _check_text("name", name, MAX_NAME_CHARS)
    node_id, protocol_version = properties["id"], int(properties["pv"])
    if not node_id or len(node_id) > 64 or not node_id.isalnum():
        raise ValueError(f"bad node id {node_id!r}")
    if protocol_version != PROTOCOL_VERSION:
        # another protocol may use other keys: list it as incompatible with whatever we can read
        values = {key: properties.get(key, "") for key in REQUIRED_KEYS}
        lenient = {key: values[key] if values[key].replace(".", "", 1).isdigit() else "0"
                   for key in ("rt", "ra", "vt", "vf", "om", "gf", "bw", "t")}
        values.update(lenient)
        status: Status = "incompatible"
    else:
        values = {key: properties[key] for key in REQUIRED_KEYS}
        status = "ok" if values["cf"] == cluster_fingerprint else "other_cluster"
    for key, limit in TEXT_LIMITS.items():
        _check_text(key, values[key], limit)
    port = srv_port
    if values.get("p", "").isdigit() and 0 < int(values["p"]) < 65536:
        port = int(values["p"])
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    peer = PeerInfo(
        name=name, node_id=node_id, address=pick_address(addresses), port=port,
        version=values["v"], protocol_version=protocol_version, cluster_fingerprint=values["cf"],
        accelerator=values["ac"], device_name=values["dn"],
        ram_total=_non_negative_int(values["rt"]), ram_available=_non_negative_int(values["ra"]),
        vram_total=_non_negative_int(values["vt"]), vram_free=_non_negative_int(values["vf"]),
        offered_memory=_non_negative_int(values["om"]), gflops=_non_negative_float(values["gf"]),
        bandwidth=_non_negative_float(values["bw"]), serving=values["sv"] == "1", status=status,
        addresses=tuple(addresses),
    )
    return peer, _non_negative_int(values["t"] or "0")
