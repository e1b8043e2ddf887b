"""What every discovery store does.

Stores keep meteorhacks-shaped documents keyed by (serviceName, endpoint) and stamp
them with their *own* clock; readers judge age against that same clock, so clock skew
between hosts can neither expire a live endpoint nor keep a dead one.
"""

from __future__ import annotations

import abc
import datetime as dt
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class StoreSnapshot:
    """All documents of the store, and the store's clock when they were read."""

    now: dt.datetime
    documents: list[dict[str, Any]]


class DiscoveryStore(abc.ABC):
    """A place where endpoint records live. Methods raise ``DiscoveryError``."""

    #: shown by ``cluster status`` and in logs; never includes credentials
    description: str = ""

    @abc.abstractmethod
    def heartbeat(self, record: Mapping[str, Any]) -> None:
        """Upsert ``record`` by (serviceName, endpoint), timestamped by the store."""

    @abc.abstractmethod
    def remove(self, service: str, endpoint: str) -> None:
        """Delete the record of (service, endpoint), if any."""

    @abc.abstractmethod
    def snapshot(self) -> StoreSnapshot:
        """Every record, with the store's current time."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the store is not used afterwards."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"
