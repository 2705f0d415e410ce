//! Shared helpers for the integration tests (`mod common;` in each test file).
#![allow(dead_code)]

pub mod dovecot;
pub mod fake;
pub mod gateway;
pub mod http;
pub mod imap;
pub mod process;
pub mod tls;
pub mod wait;
