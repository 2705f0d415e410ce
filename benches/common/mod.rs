//! What every micro-benchmark shares: the criterion settings.

use std::time::Duration;

use criterion::Criterion;

/// Short warm-up and measurement: the machine has two cores that the rest of the work
/// shares, and these benches measure nanosecond-scale operations, so 3 s holds millions of
/// iterations.
pub fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}
