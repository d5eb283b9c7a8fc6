//! Test harness, by concern: the real server on 127.0.0.1 port 0 and its clients (`server`), a
//! store that fails on purpose (`faulty`), real redis-server processes (`redis`), Sentinel and
//! Cluster topologies of them (`topology`), and scenarios several test files run (`scenarios`).
#![allow(dead_code, unused_imports, unused_macros)]

/// Runs `$body` every 20 ms until it `break`s (with a value, if the poll is an expression), and
/// fails the test naming `$what` if `$within` passes first: [`eventually`] for bodies that do more
/// than test a condition.
macro_rules! poll {
    ($what:expr, $within:expr, $body:block) => {{
        let within: std::time::Duration = $within;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            $body
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} within {:?}",
                $what,
                within
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

/// Polls `$cond` (an expression, which may `.await`) every 20 ms until it is true, and fails the
/// test naming `$what` if `$within` passes first. Tests of real processes wait for what they can
/// observe this way, never for a fixed time; fixed waits remain only where a test asserts that
/// something does *not* happen for a while.
macro_rules! eventually {
    ($what:expr, $within:expr, $cond:expr) => {{
        let within: std::time::Duration = $within;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if $cond {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} within {:?}",
                $what,
                within
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

mod cli;
mod faulty;
mod redis;
mod scenarios;
mod server;
mod topology;

pub use cli::*;
pub use faulty::*;
pub use redis::*;
pub use scenarios::*;
pub use server::*;
pub use topology::*;
