//! Issue 32: a replica's heap grew about 10 MiB a minute under check load. The cause: the
//! Prometheus recorder keeps every histogram sample (each check's and each store lookup's
//! duration, 8 bytes apiece) until the scrape endpoint renders them, so a replica nobody scraped,
//! or scraped rarely, held them all. The server now runs the recorder's upkeep on its own, which
//! folds the samples into the histograms' buckets. This test counts the live heap with a counting
//! allocator: a million samples recorded with nobody scraping must not stay on the heap.

#[macro_use]
mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use common::{TestServer, test_config};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a side note.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram_samples_do_not_pile_up_on_the_heap_while_nobody_scrapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.metrics_listener = Some(Arc::new(
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
    ));
    let server = TestServer::start_with(config).await;
    let record = |n: u32| {
        for i in 0..n {
            metrics::histogram!("optout_check_duration_seconds", "rpc" => "check")
                .record(f64::from(i % 1000) * 1e-6);
        }
    };
    // What a replica records per check request, a million times over (a few minutes of a busy
    // replica), with no scrape.
    let before = LIVE.load(Ordering::Relaxed);
    record(1_000_000);
    let piled = LIVE.load(Ordering::Relaxed) - before;
    assert!(
        piled > 4 << 20,
        "the samples are held until folded in ({piled} bytes): the test measures what it means to"
    );
    // Traffic goes on at a trickle (the recorder frees drained blocks as later samples come in):
    // within a few upkeep intervals the million samples are buckets, not heap.
    eventually!(
        "the samples folded into their buckets, not held",
        Duration::from_secs(20),
        {
            record(200);
            LIVE.load(Ordering::Relaxed) - before < 1 << 20
        }
    );
    server.stop().await;
}
