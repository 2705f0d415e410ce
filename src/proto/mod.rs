//! The IMAP protocol layer, free of I/O: framing, pre-scanning, the imap-codec glue for the
//! commands the gateway parses itself, capability filtering and the gateway's own responses;
//! and the PROXY protocol header a load balancer may put in front of a connection.

pub mod args;
pub mod capability;
pub mod command;
pub mod framer;
pub mod pattern;
pub mod prescan;
pub mod proxy;
pub mod response;
