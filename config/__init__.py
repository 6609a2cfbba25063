"""Settings (environment) and the TOML configuration: funders, products, clients.

Everything is validated once, at load time, and every error is reported at once.
"""

from config.loader import ConfigError, Settings, load_config
from config.models import (
    Client,
    DispatchConfig,
    FileConfig,
    Funder,
    GatewayConfig,
    LendingCoreConfig,
    Product,
    ReconciliationConfig,
    Term,
)

__all__ = [
    "Client",
    "ConfigError",
    "DispatchConfig",
    "FileConfig",
    "Funder",
    "GatewayConfig",
    "LendingCoreConfig",
    "Product",
    "ReconciliationConfig",
    "Settings",
    "Term",
    "load_config",
]
