"""xtransit: anycast GRE and IPsec tunnel edge (control plane package)."""

__version__ = "0.1.0"
