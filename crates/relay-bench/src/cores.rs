//! Giving the server and the bench cores of their own for the fan-out.
//!
//! On a small machine the fan-out's stream readers and the server's writes to them compete
//! for the same cores. Linux wakes a socket's reader on the writer's own core (a "sync"
//! wake-up: the writer is expected to sleep soon), but a fan-out writer goes on to its next
//! hundred writes, and the reader waits for the writer's time slice to end, up to a
//! millisecond, while another core idles. That wait would be counted as the server's
//! latency though the server had delivered; readers on other machines, as in production,
//! never have it. A server started on half the cores (its runtime sized to them, as on a
//! machine of that size) and a bench kept to the other half is the nearest one machine
//! gets to that.

use std::io;

pub struct CoreSplit {
    all: Vec<usize>,
    /// The first half, the larger one: the server's writes also run the kernel's receiving
    /// side of each loopback connection.
    pub server: Vec<usize>,
    pub bench: Vec<usize>,
}

impl CoreSplit {
    /// Halves the cores this thread may use; `None` with fewer than two.
    pub fn plan() -> io::Result<Option<Self>> {
        let all = affinity::allowed()?;
        if all.len() < 2 {
            return Ok(None);
        }
        let (server, bench) = all.split_at(all.len().div_ceil(2));
        Ok(Some(Self { server: server.to_vec(), bench: bench.to_vec(), all }))
    }

    /// Runs `start` on this thread pinned to the server's cores, so that a process it
    /// spawns is born there; then gives the thread back all its cores.
    pub fn on_server_cores<T>(&self, start: impl FnOnce() -> T) -> io::Result<T> {
        affinity::pin_thread(&self.server)?;
        let started = start();
        affinity::pin_thread(&self.all)?;
        Ok(started)
    }

    /// Keeps every thread of this process on the bench's cores until the guard drops.
    pub fn pin_bench(&self) -> io::Result<BenchPinned<'_>> {
        affinity::pin_process(&self.bench)?;
        Ok(BenchPinned(self))
    }
}

pub struct BenchPinned<'a>(&'a CoreSplit);

impl Drop for BenchPinned<'_> {
    fn drop(&mut self) {
        if let Err(e) = affinity::pin_process(&self.0.all) {
            eprintln!("relay-bench: could not give the bench its cores back: {e}");
        }
    }
}

#[cfg(target_os = "linux")]
mod affinity {
    use std::io;

    fn set_of(cpus: &[usize]) -> libc::cpu_set_t {
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it for any cpu
        // below CPU_SETSIZE, which is all the kernel reports.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        set
    }

    fn set_affinity(tid: libc::pid_t, set: &libc::cpu_set_t) -> io::Result<()> {
        // SAFETY: the kernel reads at most size_of::<cpu_set_t>() bytes from `set`.
        match unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), set) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// The cores the calling thread may run on.
    pub fn allowed() -> io::Result<Vec<usize>> {
        let mut set = set_of(&[]);
        // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set`.
        if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect())
    }

    pub fn pin_thread(cpus: &[usize]) -> io::Result<()> {
        set_affinity(0, &set_of(cpus))
    }

    /// Every thread of this process; threads started later inherit their creator's cores.
    pub fn pin_process(cpus: &[usize]) -> io::Result<()> {
        let set = set_of(cpus);
        for task in std::fs::read_dir("/proc/self/task")? {
            let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) else { continue };
            match set_affinity(tid, &set) {
                // a thread that ended since the listing
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                other => other?,
            }
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod affinity {
    use std::io;

    /// No thread affinity here: as far as splitting goes, a single core.
    pub fn allowed() -> io::Result<Vec<usize>> {
        Ok(vec![0])
    }

    pub fn pin_thread(_cpus: &[usize]) -> io::Result<()> {
        Ok(())
    }

    pub fn pin_process(_cpus: &[usize]) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn cores_of(pid: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_owned()
    }

    /// "0-2,5" → [0, 1, 2, 5]
    fn parse(list: &str) -> Vec<usize> {
        list.split(',')
            .flat_map(|part| match part.split_once('-') {
                Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
                None => vec![part.parse().unwrap()],
            })
            .collect()
    }

    #[test]
    fn the_server_is_born_on_its_cores_and_the_bench_keeps_to_the_others() {
        let all = affinity::allowed().unwrap();
        let Some(split) = CoreSplit::plan().unwrap() else {
            assert_eq!(all.len(), 1, "only a single core goes unsplit");
            return;
        };
        assert_eq!([split.server.clone(), split.bench.clone()].concat(), all);
        assert!(split.server.len() >= split.bench.len() && !split.bench.is_empty());

        let mut child = split.on_server_cores(|| std::process::Command::new("sleep").arg("30").spawn().unwrap()).unwrap();
        assert_eq!(parse(&cores_of(&child.id().to_string())), split.server);
        assert_eq!(affinity::allowed().unwrap(), all, "the spawning thread got its cores back");

        let pinned = split.pin_bench().unwrap();
        assert_eq!(parse(&cores_of("self")), split.bench);
        drop(pinned);
        assert_eq!(parse(&cores_of("self")), all);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
