//! Write policies: what a volume asked for and what it gets right now.
//!
//! The *requested* policy is configuration. The *effective* policy is what the engine can
//! honour at the moment: a write-back request runs write-through while the flash device is
//! degraded (after a write error) and returns to write-back by itself once the device's log is
//! empty again. Both are visible to operators (DESIGN.md, "Write policies").

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePolicy {
    /// Acknowledge after the SAN write completes; flash keeps a clean copy.
    WriteThrough,
    /// Acknowledge after the local flash log write is durable; destage later.
    WriteBack,
}

/// Why the effective policy is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EffectiveReason {
    /// Effective equals requested.
    AsRequested,
    /// The flash device had a write error: write-through until its log drains.
    FlashDegraded,
    /// A write-back+N volume misses a replica link (not connected yet, or lost): write-through
    /// until every replica is back and in sync.
    ReplicaUnavailable,
    /// Every replica is connected, but one lacks entries that are not destaged yet:
    /// write-through until they are and the replica knows it.
    ReplicaSyncing,
    /// A replica serves its rescued copy of the volume in place of its lost owner: it keeps no
    /// log of it, every write goes to the SAN.
    ServingRescuedCopy,
}

impl fmt::Display for EffectiveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EffectiveReason::AsRequested => "as requested",
            EffectiveReason::FlashDegraded => "flash degraded",
            EffectiveReason::ReplicaUnavailable => "replica unavailable",
            EffectiveReason::ReplicaSyncing => "replica syncing",
            EffectiveReason::ServingRescuedCopy => "serving a rescued copy",
        })
    }
}

impl WritePolicy {
    /// The policy the engine applies given the request and the device's health.
    pub fn effective(requested: WritePolicy, flash_degraded: bool) -> (WritePolicy, EffectiveReason) {
        match (requested, flash_degraded) {
            (WritePolicy::WriteBack, true) => (WritePolicy::WriteThrough, EffectiveReason::FlashDegraded),
            (p, _) => (p, EffectiveReason::AsRequested),
        }
    }
}

impl fmt::Display for WritePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WritePolicy::WriteThrough => "write-through",
            WritePolicy::WriteBack => "write-back",
        })
    }
}

impl std::str::FromStr for WritePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "write-through" => Ok(WritePolicy::WriteThrough),
            "write-back" => Ok(WritePolicy::WriteBack),
            other => Err(format!("unknown write policy {other:?} (expected write-through or write-back)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degraded_flash_forces_write_through() {
        use WritePolicy::*;
        assert_eq!(WritePolicy::effective(WriteBack, false), (WriteBack, EffectiveReason::AsRequested));
        assert_eq!(WritePolicy::effective(WriteBack, true), (WriteThrough, EffectiveReason::FlashDegraded));
        assert_eq!(WritePolicy::effective(WriteThrough, true), (WriteThrough, EffectiveReason::AsRequested));
        assert_eq!("write-back".parse::<WritePolicy>(), Ok(WriteBack));
        assert!("write-around".parse::<WritePolicy>().is_err());
    }
}
