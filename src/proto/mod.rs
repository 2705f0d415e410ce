//! The IMAP protocol layer, free of I/O: framing, pre-scanning, the imap-codec glue for the
//! commands the gateway parses itself, capability filtering and the gateway's own responses.

pub mod args;
pub mod capability;
pub mod command;
pub mod framer;
pub mod pattern;
pub mod prescan;
pub mod response;
