//! Test harness, by concern: the real server on 127.0.0.1 port 0 and its clients (`server`), a
//! store that fails on purpose (`faulty`), real redis-server processes (`redis`), Sentinel and
//! Cluster topologies of them (`topology`), and scenarios several test files run (`scenarios`).
#![allow(dead_code, unused_imports)]

mod faulty;
mod redis;
mod scenarios;
mod server;
mod topology;

pub use faulty::*;
pub use redis::*;
pub use scenarios::*;
pub use server::*;
pub use topology::*;
