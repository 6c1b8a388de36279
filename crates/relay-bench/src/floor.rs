//! What this machine itself allows a fan-out: no relay, only plain writes.
//!
//! One event to 1,000 streams is 1,000 writes to 1,000 sockets, and on a small virtual
//! machine a write to a loopback TCP socket costs microseconds whoever makes it (the
//! kernel runs the receiving side's TCP in the writer's call, too). The fan-out's figures
//! mean little without this floor beside them.

use std::time::Duration;

/// The median time to write one `frame`-byte chunk to each of `streams` loopback TCP
/// connections, the writes split over two threads, while one thread reads every
/// connection as the bench's stream readers do (epoll). `None` where epoll is missing.
#[cfg(target_os = "linux")]
pub fn loopback_writes(streams: usize, frame: usize, rounds: usize) -> std::io::Result<Option<Duration>> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    const WRITERS: usize = 2;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let (mut readers, mut writers) = (Vec::with_capacity(streams), Vec::with_capacity(streams));
    for _ in 0..streams {
        let reader = TcpStream::connect(listener.local_addr()?)?;
        let (writer, _) = listener.accept()?;
        writer.set_nodelay(true)?; // as relay-server's are
        reader.set_nonblocking(true)?;
        readers.push(reader);
        writers.push(writer);
    }
    // SAFETY: epoll_create1 returns a new descriptor or -1; the OwnedFd closes it.
    let epoll = match unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } {
        -1 => return Err(std::io::Error::last_os_error()),
        fd => unsafe { OwnedFd::from_raw_fd(fd) },
    };
    for (index, reader) in readers.iter().enumerate() {
        let mut interest = libc::epoll_event { events: libc::EPOLLIN as u32, u64: index as u64 };
        // SAFETY: both descriptors are open; the kernel copies `interest`.
        if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, reader.as_raw_fd(), &mut interest) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reading = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut ready = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
            let mut buf = vec![0u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: `ready` has room for the count passed.
                let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), ready.as_mut_ptr(), ready.len() as i32, 20) };
                for event in &ready[..n.max(0) as usize] {
                    let mut reader = &readers[event.u64 as usize];
                    while matches!(reader.read(&mut buf), Ok(got) if got > 0) {}
                }
            }
        })
    };
    let chunk = vec![b'x'; frame];
    let mut rounds_took = Vec::with_capacity(rounds);
    let written = (0..rounds).try_for_each(|_| {
        let started = Instant::now();
        std::thread::scope(|scope| {
            let parts: Vec<_> = (0..WRITERS)
                .map(|part| {
                    let (writers, chunk) = (&writers, &chunk);
                    scope.spawn(move || writers.iter().skip(part).step_by(WRITERS).try_for_each(|mut w| w.write_all(chunk)))
                })
                .collect();
            parts.into_iter().try_for_each(|part| part.join().expect("a writer thread panicked"))
        })?;
        rounds_took.push(started.elapsed());
        // the reader catches up, as between two sends of the fan-out
        std::thread::sleep(Duration::from_millis(30));
        std::io::Result::Ok(())
    });
    stop.store(true, Ordering::Relaxed);
    let _ = reading.join();
    written?;
    rounds_took.sort();
    Ok(rounds_took.get(rounds_took.len() / 2).copied())
}

#[cfg(not(target_os = "linux"))]
pub fn loopback_writes(_streams: usize, _frame: usize, _rounds: usize) -> std::io::Result<Option<Duration>> {
    Ok(None)
}
