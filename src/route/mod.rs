//! The routing table: which backend serves which user. Immutable once built; a lookup is a
//! couple of hash-map probes and, for the default pool, rendezvous hashing, so every replica
//! routes the same user to the same backend without sharing state. `Routes` holds the table
//! in use and replaces it on reload.

mod reload;
mod table;

pub use reload::{Reloaded, Routes, Trigger};
pub use table::{
    Backend, BackendTls, Mount, MountTarget, NamespaceKind, Route, RouteError, RoutingTable,
};
