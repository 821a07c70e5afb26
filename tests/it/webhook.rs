//! The webhook receiver: signatures, deduplication, ordering, durability, fixtures and scenarios.
