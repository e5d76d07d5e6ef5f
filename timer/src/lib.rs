//! `futures_timer::Delay` on tokio's timer. libp2p arms one of these for every gossip
//! message queued to every peer (gossipsub's publish and forward timeouts) and for every
//! request; futures-timer wakes its helper thread twice per timer (when it is made and
//! when it is dropped), which on a busy two-core machine running eight nodes was a
//! thread switch per frame. Inside a tokio runtime (every node, every test) a `Delay` is
//! a tokio `Sleep`, armed on the worker that polls it; outside one it falls back to a
//! thread that sleeps until the deadline, so nothing panics for want of a runtime.
//!
//! The public surface is futures-timer 3.0's: `Delay::new`, `Delay::reset`, `Future`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A future that completes once its deadline has passed.
pub struct Delay {
    inner: Inner,
}

enum Inner {
    Tokio(Pin<Box<tokio::time::Sleep>>),
    Thread(Arc<Shared>),
}

impl Delay {
    /// Completes `dur` from now.
    pub fn new(dur: Duration) -> Delay {
        let at = deadline(dur);
        let inner = match tokio::runtime::Handle::try_current() {
            Ok(_) => Inner::Tokio(Box::pin(tokio::time::sleep_until(at.into()))),
            Err(_) => Inner::Thread(Shared::start(at)),
        };
        Delay { inner }
    }

    /// Completes `dur` from now instead, whether or not it had completed.
    pub fn reset(&mut self, dur: Duration) {
        let at = deadline(dur);
        match &mut self.inner {
            Inner::Tokio(sleep) => sleep.as_mut().reset(at.into()),
            Inner::Thread(shared) => shared.reset(at),
        }
    }
}

/// `now + dur`, saturating far in the future (futures-timer accepts any duration).
fn deadline(dur: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(dur).unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

impl Future for Delay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.inner {
            Inner::Tokio(sleep) => sleep.as_mut().poll(cx),
            Inner::Thread(shared) => shared.poll(cx),
        }
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        if let Inner::Thread(shared) = &self.inner {
            shared.cancel();
        }
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delay").finish()
    }
}

/// The fallback outside a runtime: one sleeping thread per armed delay.
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    at: Instant,
    fired: bool,
    cancelled: bool,
    /// A thread is waiting for `at`.
    armed: bool,
    waker: Option<Waker>,
}

impl Shared {
    fn start(at: Instant) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { at, fired: false, cancelled: false, armed: false, waker: None }),
            changed: Condvar::new(),
        });
        shared.arm();
        shared
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arm(self: &Arc<Self>) {
        let mut st = self.lock();
        if st.armed {
            // The waiting thread sees the new deadline.
            self.changed.notify_one();
            return;
        }
        st.armed = true;
        drop(st);
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("delay".into()).spawn(move || me.wait());
        if spawned.is_err() {
            // No thread: fire now rather than never (a timeout early, not a hang).
            let mut st = self.lock();
            st.armed = false;
            st.fired = true;
            if let Some(w) = st.waker.take() {
                w.wake();
            }
        }
    }

    fn wait(&self) {
        let mut st = self.lock();
        loop {
            if st.cancelled {
                break;
            }
            let now = Instant::now();
            if now >= st.at {
                st.fired = true;
                if let Some(w) = st.waker.take() {
                    w.wake();
                }
                break;
            }
            let left = st.at - now;
            st = self.changed.wait_timeout(st, left).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
        st.armed = false;
    }

    fn reset(self: &Arc<Self>, at: Instant) {
        {
            let mut st = self.lock();
            st.at = at;
            st.fired = false;
        }
        self.arm();
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.lock();
        if st.fired {
            return Poll::Ready(());
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn cancel(&self) {
        self.lock().cancelled = true;
        self.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inside_a_runtime_it_is_a_tokio_sleep_and_fires() {
        let t = Instant::now();
        let d = Delay::new(Duration::from_millis(20));
        assert!(matches!(d.inner, Inner::Tokio(_)));
        d.await;
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[tokio::test]
    async fn reset_moves_the_deadline_even_after_firing() {
        let mut d = Delay::new(Duration::from_millis(1));
        (&mut d).await;
        let t = Instant::now();
        d.reset(Duration::from_millis(30));
        (&mut d).await;
        assert!(t.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn outside_a_runtime_a_thread_fires_it() {
        let t = Instant::now();
        let mut d = Delay::new(Duration::from_millis(20));
        assert!(matches!(d.inner, Inner::Thread(_)));
        futures::executor::block_on(&mut d);
        assert!(t.elapsed() >= Duration::from_millis(20));
        // Reset after it fired: armed again.
        let t = Instant::now();
        d.reset(Duration::from_millis(10));
        futures::executor::block_on(&mut d);
        assert!(t.elapsed() >= Duration::from_millis(10));
    }

    #[test]
    fn outside_a_runtime_a_reset_to_later_is_honoured() {
        let t = Instant::now();
        let mut d = Delay::new(Duration::from_millis(5));
        d.reset(Duration::from_millis(40));
        futures::executor::block_on(&mut d);
        assert!(t.elapsed() >= Duration::from_millis(40));
    }

    #[test]
    fn a_dropped_delay_lets_its_thread_go() {
        let d = Delay::new(Duration::from_secs(3600));
        let Inner::Thread(shared) = &d.inner else { panic!("outside a runtime") };
        let shared = shared.clone();
        drop(d);
        let t = Instant::now();
        while shared.lock().armed {
            assert!(t.elapsed() < Duration::from_secs(5), "the thread did not see the cancel");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_huge_duration_does_not_overflow() {
        let _ = deadline(Duration::MAX);
        drop(Delay::new(Duration::MAX));
    }
}
