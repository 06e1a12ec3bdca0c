//! Background work with a thread and a small runtime of its own: the
//! `jwks_url` fetcher and the upstream health checks. It can be started from
//! anywhere (the first configuration is built before any tokio runtime
//! exists) and never competes with requests on a worker. It belongs to one
//! runtime generation: dropping the [`Background`] stops it, so a reload's
//! old generation stops fetching and checking for state no request reaches.

use std::future::Future;

use tokio_util::sync::CancellationToken;

pub struct Background {
    stop: CancellationToken,
}

impl Background {
    /// Runs the future `make` returns on a new thread named `name`, until it
    /// ends or the handle is dropped. Fails when the thread or its runtime
    /// cannot be made.
    pub fn start<F, M>(name: &str, make: M) -> std::io::Result<Background>
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()>,
    {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        // Built on the new thread: a runtime dropped on the caller's, were
        // the spawn to fail after building it, would panic inside a reload.
        let (built_tx, built_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = built_tx.send(Err(error));
                        return;
                    }
                };
                let _ = built_tx.send(Ok(()));
                runtime.block_on(async move {
                    tokio::select! {
                        () = stopped.cancelled() => {}
                        () = make() => {}
                    }
                });
            })?;
        match built_rx.recv() {
            Ok(Ok(())) => Ok(Background { stop }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(std::io::Error::other(format!(
                "the {name} thread ended before it started"
            ))),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
