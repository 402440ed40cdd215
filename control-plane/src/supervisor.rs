//! Background tasks live as long as the daemon: one that ends or panics before shutdown is
//! logged, counted (`graylane_task_restarts_total{task}`) and started again after a backoff,
//! so a bug in discovery or the xDS server degrades the daemon instead of stopping it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::Metrics;

/// First and longest wait before a restart; a task that ran this long restarts at once again.
const FIRST: Duration = Duration::from_secs(1);
const LONGEST: Duration = Duration::from_secs(30);
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs `make()` until `shutdown`, restarting it with backoff whenever it ends or panics.
pub async fn supervise<F, Fut>(
    task: &'static str,
    mut make: F,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = FIRST;
    loop {
        let started = Instant::now();
        let handle = tokio::spawn(make().instrument(tracing::info_span!("task", task)));
        let outcome = handle.await;
        if shutdown.is_cancelled() {
            return;
        }
        match outcome {
            Ok(()) => tracing::error!(task, "background task stopped; restarting"),
            Err(e) if e.is_panic() => {
                tracing::error!(task, "background task panicked; restarting");
            }
            Err(e) => tracing::error!(task, error = %e, "background task failed; restarting"),
        }
        metrics.task_restarted(task);
        if started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(LONGEST);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_or_ends_is_restarted_with_backoff_until_shutdown() {
        let runs = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let r = runs.clone();
        let stop = shutdown.clone();
        let t0 = Instant::now();
        let sup = tokio::spawn(supervise(
            "discovery",
            move || {
                let n = r.fetch_add(1, Ordering::SeqCst);
                let stop = stop.clone();
                async move {
                    match n {
                        0 => panic!("a bug"),
                        1 => {} // ends on its own
                        _ => stop.cancelled().await,
                    }
                }
            },
            metrics.clone(),
            shutdown.clone(),
        ));
        // Third run: up after the 1 s and 2 s backoffs.
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(4),
            "{took:?}"
        );
        shutdown.cancel();
        sup.await.unwrap();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "not restarted after shutdown"
        );
        let text = metrics.render(&crate::snapshot::Snapshot::default());
        assert!(
            text.contains("graylane_task_restarts_total{task=\"discovery\"} 2"),
            "{text}"
        );
    }
}
