"""dva: distributed virtual network appliances."""

__version__ = "0.1.0"
