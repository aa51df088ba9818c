"""The collector's ad store: soft state by design, as in HTCondor.

Ads are kept by type and name and expire unless refreshed. Each ad belongs to the identity that
advertised it; another identity may replace or invalidate it only with ADMINISTRATOR rights.
Encodings are cached per ad, so a query over a large pool mostly copies bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from gwms import classads

# The level an UPDATE or INVALIDATE needs, by ad type (MyType, case-insensitive). Types not
# listed need ADVERTISE_MASTER, HTCondor's level for generic daemon ads.
ADVERTISE_LEVELS = {
    "machine": "ADVERTISE_STARTD",
    "scheduler": "ADVERTISE_SCHEDD",
    "submitter": "ADVERTISE_SCHEDD",
    "negotiator": "NEGOTIATOR",
    "collector": "DAEMON",
    "glidefactory": "ADVERTISE_FACTORY",
    "glidefactoryclient": "ADVERTISE_FACTORY",
    "glidefactoryglobal": "ADVERTISE_FACTORY",
    "glideclient": "ADVERTISE_FRONTEND",
    "glideclientglobal": "ADVERTISE_FRONTEND",
    "glideresource": "ADVERTISE_FRONTEND",
}


def advertise_level(ad_type: str) -> str:
    return ADVERTISE_LEVELS.get(ad_type.lower(), "ADVERTISE_MASTER")


class StoreError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class StoredAd:
    ad: classads.ClassAd
    owner: str  # "method:name" of the identity that advertised it
    expires: float
    has_private: bool
    _full: bytes | None = None
    _public: bytes | None = None

    def encoded(self, private_attributes: Sequence[str], include_private: bool) -> bytes:
        if include_private or not self.has_private:
            if self._full is None:
                self._full = classads.encode(self.ad)
            return self._full
        if self._public is None:
            self._public = classads.encode(classads.without(self.ad, private_attributes))
        return self._public


def _string_attr(ad: classads.ClassAd, name: str) -> str:
    value = ad.get(name)
    if not isinstance(value, str) or not value:
        raise StoreError("MALFORMED_AD", f"the ad needs a string attribute {name}")
    return value


class AdStore:
    def __init__(self, clock: Any, default_lifetime: float, max_lifetime: float,
                 private_attributes: Sequence[str], max_ads: int) -> None:
        self.clock = clock
        self.default_lifetime = default_lifetime
        self.max_lifetime = max_lifetime
        self.private_attributes = tuple(private_attributes)
        self._private_lower = frozenset(a.lower() for a in private_attributes)
        self.max_ads = max_ads
        self._ads: dict[str, dict[str, StoredAd]] = {}
        self.count = 0
        self.updates = 0

    def update(self, ad: classads.ClassAd, owner: str, identity_name: str,
               may_replace_others: Callable[[], bool]) -> StoredAd:
        """Store ``ad`` for its (MyType, Name), stamped with who sent it and when."""
        ad_type = _string_attr(ad, "MyType")
        name = _string_attr(ad, "Name")
        by_name = self._ads.setdefault(ad_type.lower(), {})
        old = by_name.get(name)
        now = self.clock.seconds()
        if old is not None and old.owner != owner and old.expires > now and not may_replace_others():
            raise StoreError("NOT_OWNER", f"{ad_type} ad {name!r} belongs to "
                                          f"{old.ad.get('AuthenticatedIdentity')!r}; only it or an "
                                          "ADMINISTRATOR may replace it")
        if old is None and self.count >= self.max_ads:
            raise StoreError("STORE_FULL", f"the collector holds its maximum of {self.max_ads} ads")
        lifetime = ad.get("ClassAdLifetime")
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = self.default_lifetime
        lifetime = min(float(lifetime), self.max_lifetime)
        method, _, _ = owner.partition(":")
        ad["AuthenticatedIdentity"] = identity_name
        ad["AuthenticationMethod"] = method
        ad["LastHeardFrom"] = int(now)
        has_private = any(a in ad for a in self.private_attributes)
        stored = StoredAd(ad, owner, now + lifetime, has_private)
        by_name[name] = stored
        if old is None:
            self.count += 1
        self.updates += 1
        return stored

    def get(self, ad_type: str, name: str) -> StoredAd | None:
        stored = self._ads.get(ad_type.lower(), {}).get(name)
        if stored is None or stored.expires <= self.clock.seconds():
            return None
        return stored

    def invalidate(self, ad_type: str, name: str | None, constraint: Any, owner: str,
                   may_remove_others: Callable[[], bool]) -> int:
        """Remove the named ad, or every ad of the type matching ``constraint``; only the
        owner's own ads unless the caller may remove others'. Returns how many went."""
        by_name = self._ads.get(ad_type.lower(), {})
        if name is not None:
            candidates = [name] if name in by_name else []
        else:
            candidates = [n for n, s in by_name.items() if classads.evaluate_constraint(constraint, s.ad)]
        admin: bool | None = None
        removed = 0
        for n in candidates:
            stored = by_name[n]
            if stored.owner != owner:
                if admin is None:
                    admin = may_remove_others()
                if not admin:
                    if name is not None:
                        raise StoreError("NOT_OWNER", f"{ad_type} ad {n!r} belongs to "
                                                      f"{stored.ad.get('AuthenticatedIdentity')!r}")
                    continue
            del by_name[n]
            self.count -= 1
            removed += 1
        return removed

    def query(self, ad_type: str, constraint: Any, projection: Sequence[str], include_private: bool,
              limit: int | None = None) -> Iterator[bytes]:
        """Encoded ads of ``ad_type`` ("any" for all) that satisfy ``constraint``."""
        now = self.clock.seconds()
        tables = self._ads.values() if ad_type.lower() == "any" else [self._ads.get(ad_type.lower(), {})]
        sent = 0
        hidden = () if include_private else self.private_attributes
        for table in tables:
            for stored in list(table.values()):
                if stored.expires <= now:
                    continue
                if constraint is not None and not classads.evaluate_constraint(constraint, stored.ad):
                    continue
                if projection:
                    wanted = [a for a in projection if a.lower() not in self._private_lower or include_private]
                    yield classads.encode(classads.project(stored.ad, wanted))
                else:
                    yield stored.encoded(hidden, include_private)
                sent += 1
                if limit is not None and sent >= limit:
                    return

    def expire(self) -> int:
        """Drop every ad past its lifetime; returns how many."""
        now = self.clock.seconds()
        dropped = 0
        for table in self._ads.values():
            dead = [name for name, stored in table.items() if stored.expires <= now]
            for name in dead:
                del table[name]
            dropped += len(dead)
        self.count -= dropped
        return dropped

    def counts(self) -> dict[str, int]:
        return {t: len(table) for t, table in self._ads.items() if table}
