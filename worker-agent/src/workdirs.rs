//! Where attempts' workspaces come from and where they go: `work_dir/tasks/<task>-<epoch>`,
//! made for the attempt and emptied when it ends.
//!
//! An ended attempt's workspace is emptied and kept, empty, under `work_dir/free/`, and the
//! next attempt's workspace is one of those renamed into place; only when none is free is a
//! directory made. Why: a rename allocates no inode, and on ext4 without a journal (these
//! build machines) an inode allocation scans past every inode freed in the last minute, which
//! at a few hundred attempts a second cost 0.7 ms per directory on the dispatch path. At most
//! [`KEPT_FREE`] are kept; the rest are removed.
//!
//! Nothing of an attempt is kept once it has ended: what it must leave behind are its declared
//! outputs, which the coordinator has stored before the attempt's end is reported. Workspaces
//! of attempts that died with an earlier run of the worker are removed at start-up, on a
//! thread of their own so a large leftover does not hold up the start (a removal cut short by
//! the worker's exit goes on at the next start).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Empty workspaces kept for reuse.
pub const KEPT_FREE: usize = 16;

/// The worker's workspaces; cheap to clone.
#[derive(Debug, Clone)]
pub struct Workdirs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tasks: PathBuf,
    free_dir: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    /// Removes what an earlier run left (see the module docs); finished or not, nobody waits.
    sweeper: Mutex<Option<JoinHandle<()>>>,
}

impl Workdirs {
    /// The workspaces under `work_dir`. What an earlier run of the worker left in `tasks/` is
    /// moved aside at once and removed in the background; its empty ones in `free/` are
    /// reused. Returns how many workspaces were left over.
    pub fn open(work_dir: &Path) -> io::Result<(Workdirs, usize)> {
        let tasks = work_dir.join("tasks");
        let free_dir = work_dir.join("free");
        let trash = work_dir.join("trash");
        fs::create_dir_all(&free_dir)?;
        let mut stale = 0;
        if tasks.exists() {
            stale = fs::read_dir(&tasks)?.count();
            if stale > 0 {
                fs::create_dir_all(&trash)?;
                rename_aside(&tasks, &trash, &format!("tasks-{}", std::process::id()))?;
            }
        }
        fs::create_dir_all(&tasks)?;
        let mut free = Vec::new();
        for entry in fs::read_dir(&free_dir)? {
            let path = entry?.path();
            if free.len() < KEPT_FREE && is_empty_dir(&path) {
                free.push(path);
            } else {
                move_to(&path, &trash)?;
            }
        }
        let sweeper = trash
            .exists()
            .then(|| {
                std::thread::Builder::new()
                    .name("drover-sweep".into())
                    .spawn(move || {
                        if let Err(e) = fs::remove_dir_all(&trash) {
                            tracing::warn!(dir = %trash.display(), error = %e, "cannot remove the workspaces of an earlier run; remove them by hand");
                        }
                    })
            })
            .transpose()?;
        // Past every kept one's name: renaming onto a kept (empty) directory would replace it
        // and leave the list with one directory under two entries.
        let next = free
            .iter()
            .filter_map(|p| p.file_name()?.to_str()?.parse::<u64>().ok())
            .max()
            .map_or(0, |n| n + 1);
        Ok((
            Workdirs {
                inner: Arc::new(Inner {
                    tasks,
                    free_dir,
                    free: Mutex::new(free),
                    next: AtomicU64::new(next),
                    sweeper: Mutex::new(sweeper),
                }),
            },
            stale,
        ))
    }

    /// The workspace of attempt `epoch` of `task_id`.
    pub fn path(&self, task_id: &str, epoch: u64) -> PathBuf {
        self.inner.tasks.join(format!("{task_id}-{epoch}"))
    }

    /// An empty directory at `path` (one of [`Workdirs::path`]): a free one renamed there, or
    /// a new one. One already there is left as it is.
    pub fn make(&self, path: &Path) -> io::Result<()> {
        if path.is_dir() {
            return Ok(());
        }
        while let Some(free) = self.free().pop() {
            match fs::rename(&free, path) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(dir = %free.display(), error = %e, "a free workspace cannot be reused");
                    let _ = fs::remove_dir_all(&free);
                }
            }
        }
        fs::create_dir_all(path)
    }

    /// The attempt at `path` has ended (nothing of it runs any more): empty its workspace and
    /// keep it for the next attempt, or remove it when enough are kept. A workspace that cannot
    /// be emptied is left where it is, with a warning.
    pub async fn recycle(&self, path: PathBuf) {
        if !path.is_dir() {
            return;
        }
        if !is_empty_dir(&path) {
            let dir = path.clone();
            let emptied = tokio::task::spawn_blocking(move || empty(&dir)).await;
            match emptied {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return tracing::warn!(dir = %path.display(), error = %e, "cannot empty an ended attempt's workspace; it is left in place");
                }
                Err(e) => {
                    return tracing::warn!(dir = %path.display(), error = %e, "emptying an ended attempt's workspace failed");
                }
            }
        }
        let mut free = self.free();
        if free.len() >= KEPT_FREE {
            drop(free);
            if let Err(e) = fs::remove_dir(&path) {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove an ended attempt's workspace");
            }
            return;
        }
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let to = self.inner.free_dir.join(n.to_string());
        match fs::rename(&path, &to) {
            Ok(()) => free.push(to),
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "cannot keep an ended attempt's workspace for reuse");
                let _ = fs::remove_dir(&path);
            }
        }
    }

    /// Whether the removal of an earlier run's workspaces is still going on.
    pub fn sweeping(&self) -> bool {
        let sweeper = self.inner.sweeper.lock().unwrap_or_else(|e| e.into_inner());
        sweeper.as_ref().is_some_and(|h| !h.is_finished())
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.inner.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
}

/// Remove everything in `dir`, not following symbolic links.
fn empty(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Move `path` into the directory `trash` under a name of its own.
fn move_to(path: &Path, trash: &Path) -> io::Result<()> {
    fs::create_dir_all(trash)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    rename_aside(path, trash, &format!("free-{}-{name}", std::process::id()))
}

/// Renames `from` to `trash/<base>`, or `trash/<base>.1`, `.2`, ... when that name is taken:
/// by what an earlier run with the same pid (a container's worker is often pid 1) moved
/// aside and had not finished removing when it stopped.
fn rename_aside(from: &Path, trash: &Path, base: &str) -> io::Result<()> {
    let mut last = None;
    for n in 0..1000 {
        let name = if n == 0 {
            base.to_owned()
        } else {
            format!("{base}.{n}")
        };
        match fs::rename(from, trash.join(name)) {
            Ok(()) => return Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EEXIST | nix::libc::ENOTEMPTY)
                ) || e.kind() == io::ErrorKind::AlreadyExists =>
            {
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free name in the trash directory")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ended_workspaces_are_emptied_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (w, stale) = Workdirs::open(dir.path()).unwrap();
        assert_eq!(stale, 0);
        let a = w.path("t1", 1);
        w.make(&a).unwrap();
        fs::create_dir_all(a.join("deep/er")).unwrap();
        fs::write(a.join("deep/er/file"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", a.join("link")).unwrap();
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let first = inode(&a);
        w.recycle(a.clone()).await;
        assert!(!a.exists());
        assert!(
            Path::new("/etc").is_dir(),
            "a link is removed, not followed"
        );
        let b = w.path("t2", 1);
        w.make(&b).unwrap();
        assert_eq!(inode(&b), first, "the same directory, renamed");
        assert!(is_empty_dir(&b));
    }

    #[tokio::test]
    async fn at_most_kept_free_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (w, _) = Workdirs::open(dir.path()).unwrap();
        let paths: Vec<_> = (0..KEPT_FREE + 3).map(|i| w.path("t", i as u64)).collect();
        for p in &paths {
            w.make(p).unwrap();
        }
        for p in paths {
            w.recycle(p).await;
        }
        assert_eq!(
            fs::read_dir(dir.path().join("free")).unwrap().count(),
            KEPT_FREE
        );
        assert_eq!(fs::read_dir(dir.path().join("tasks")).unwrap().count(), 0);
    }

    /// Names of kept workspaces a new run reuses do not collide with the ones it gives out.
    #[tokio::test]
    async fn kept_names_are_not_given_out_again() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("free/1")).unwrap();
        let (w, _) = Workdirs::open(dir.path()).unwrap();
        let ended = w.path("t1", 1);
        fs::create_dir_all(&ended).unwrap();
        fs::write(ended.join("out"), b"x").unwrap();
        w.recycle(ended).await;
        let free = w.free().clone();
        let distinct: std::collections::BTreeSet<_> = free.iter().collect();
        assert_eq!(distinct.len(), 2, "{free:?}");
        assert!(free.iter().all(|p| p.is_dir()), "{free:?}");
    }

    /// A restart with the same pid (a container's pid 1) finds the trash an earlier run left
    /// half removed under the name it would use: it takes another name, not a failed start.
    #[test]
    fn a_half_removed_trash_of_the_same_pid_does_not_stop_a_start() {
        let dir = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        for taken in [format!("tasks-{pid}"), format!("tasks-{pid}.1")] {
            fs::create_dir_all(dir.path().join("trash").join(taken).join("t1-1/sub")).unwrap();
        }
        fs::create_dir_all(dir.path().join(format!("trash/free-{pid}-3/x"))).unwrap();
        fs::create_dir_all(dir.path().join("tasks/t9-1")).unwrap();
        fs::create_dir_all(dir.path().join("free/3/not-empty")).unwrap();
        let (w, stale) = Workdirs::open(dir.path()).expect("a start despite the trash");
        assert_eq!(stale, 1);
        assert_eq!(fs::read_dir(dir.path().join("tasks")).unwrap().count(), 0);
        assert!(!dir.path().join("free/3").exists());
        for _ in 0..500 {
            if !w.sweeping() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!dir.path().join("trash").exists(), "all of it swept");
    }

    #[test]
    fn an_earlier_runs_workspaces_are_removed_and_its_free_ones_reused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tasks/t9-1/sub")).unwrap();
        fs::write(dir.path().join("tasks/t9-1/sub/f"), b"left").unwrap();
        fs::create_dir_all(dir.path().join("free/3")).unwrap();
        fs::create_dir_all(dir.path().join("free/4/not-empty")).unwrap();
        let (w, stale) = Workdirs::open(dir.path()).unwrap();
        assert_eq!(stale, 1);
        assert_eq!(fs::read_dir(dir.path().join("tasks")).unwrap().count(), 0);
        for _ in 0..500 {
            if !w.sweeping() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!dir.path().join("trash").exists());
        assert_eq!(w.free().len(), 1);
        let p = w.path("t1", 1);
        w.make(&p).unwrap();
        assert!(p.is_dir() && !dir.path().join("free/3").exists());
    }
}
