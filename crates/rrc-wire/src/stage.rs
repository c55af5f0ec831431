//! Receiving one checkpoint delta into a staging directory.
//!
//! The backup must never hold a half-written checkpoint under a name that
//! looks committed: if the primary dies mid-transfer, the backup restores the
//! previous epoch, and that only works if the previous epoch is the newest
//! complete directory. So a delta is written to `.staging-<epoch>` and only
//! renamed to its final `<epoch as %08d>` name once every file and byte that
//! DeltaBegin announced has arrived and DeltaEnd agrees. rename(2) within one
//! directory is atomic, so an observer sees either no epoch or a whole one.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, WireError};
use crate::message::{Message, check_file_name};

/// Final directory name of a committed epoch.
pub fn epoch_dir_name(epoch: u64) -> String {
    format!("{epoch:08}")
}

/// Staging directory name of an epoch in transfer. The leading dot keeps it
/// out of any listing that looks for committed epochs by their digits.
pub fn staging_dir_name(epoch: u64) -> String {
    format!(".staging-{epoch}")
}

#[derive(Debug)]
struct OpenFile {
    name: String,
    file: File,
    next_offset: u64,
}

#[derive(Debug)]
struct Delta {
    series: String,
    epoch: u64,
    parent: Option<u64>,
    announced_files: u32,
    announced_bytes: u64,
    staging: PathBuf,
    completed: HashSet<String>,
    current: Option<OpenFile>,
    files: u32,
    bytes: u64,
    ended: bool,
}

/// Receives DeltaBegin, FileChunk... and DeltaEnd for one epoch.
///
/// Every protocol violation removes the staging directory and leaves the
/// `Stage` failed; dropping it without [`Stage::finish`] removes it too.
#[derive(Debug)]
pub struct Stage {
    dir: PathBuf,
    delta: Option<Delta>,
    failed: bool,
}

impl Stage {
    /// A receiver for one delta whose committed directory will live in `dir`.
    /// Nothing is created until DeltaBegin arrives.
    pub fn new(dir: &Path) -> Stage {
        Stage {
            dir: dir.to_path_buf(),
            delta: None,
            failed: false,
        }
    }

    pub fn epoch(&self) -> Option<u64> {
        self.delta.as_ref().map(|d| d.epoch)
    }

    pub fn series(&self) -> Option<&str> {
        self.delta.as_ref().map(|d| d.series.as_str())
    }

    pub fn parent(&self) -> Option<u64> {
        self.delta.as_ref().and_then(|d| d.parent)
    }

    /// Where files are being written, once DeltaBegin has been received.
    pub fn staging_path(&self) -> Option<&Path> {
        self.delta.as_ref().map(|d| d.staging.as_path())
    }

    /// True once a DeltaEnd matching everything received has been accepted.
    pub fn is_complete(&self) -> bool {
        self.delta.as_ref().is_some_and(|d| d.ended)
    }

    /// Takes the next message of the delta. Only DeltaBegin, FileChunk and
    /// DeltaEnd belong here; anything else is a violation.
    pub fn receive(&mut self, msg: &Message) -> Result<()> {
        if self.failed {
            return Err(WireError::Poisoned);
        }
        let r = self.apply(msg);
        if r.is_err() {
            self.failed = true;
            self.cleanup();
        }
        r
    }

    /// Makes the delta visible under its final name and returns that path.
    ///
    /// Nothing is synced: the rename is atomic for every process of this
    /// host, and a staged checkpoint is of use only to the process that
    /// received it (a backup starting again drops whatever it finds, as a
    /// host crash ends the replica anyway). Syncing each file cost a
    /// commit tens of milliseconds on a busy disk, and more than a second
    /// under load, long enough for the primary to give its backup up.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.failed {
            return Err(WireError::Poisoned);
        }
        let r = self.commit();
        if r.is_err() {
            self.failed = true;
            self.cleanup();
        }
        r
    }

    /// Discards the delta and its staging directory.
    pub fn abort(mut self) -> Result<()> {
        self.failed = true;
        if let Some(d) = self.delta.take() {
            drop(d.current);
            match fs::remove_dir_all(&d.staging) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        if let Some(d) = self.delta.take() {
            drop(d.current);
            // Best effort: the error that got us here matters more.
            let _ = fs::remove_dir_all(&d.staging);
        }
    }

    fn apply(&mut self, msg: &Message) -> Result<()> {
        match msg {
            Message::DeltaBegin {
                series,
                epoch,
                parent,
                files,
                total_bytes,
            } => self.begin(series, *epoch, *parent, *files, *total_bytes),
            Message::FileChunk {
                epoch,
                name,
                offset,
                data,
            } => self.chunk(*epoch, name, *offset, data),
            Message::DeltaEnd {
                epoch,
                files,
                total_bytes,
            } => self.end(*epoch, *files, *total_bytes),
            other => Err(violation(format!(
                "unexpected {} message during a delta transfer",
                other.message_type().name()
            ))),
        }
    }

    fn begin(
        &mut self,
        series: &str,
        epoch: u64,
        parent: Option<u64>,
        files: u32,
        total_bytes: u64,
    ) -> Result<()> {
        if let Some(d) = &self.delta {
            return Err(violation(format!(
                "DeltaBegin for epoch {epoch} while epoch {} is in transfer",
                d.epoch
            )));
        }
        if parent.is_some_and(|p| p >= epoch) {
            return Err(violation(format!(
                "epoch {epoch} claims parent {} which is not older",
                parent.unwrap_or_default()
            )));
        }
        let final_path = self.dir.join(epoch_dir_name(epoch));
        if final_path.symlink_metadata().is_ok() {
            return Err(violation(format!(
                "epoch {epoch} is already committed at {}",
                final_path.display()
            )));
        }
        let staging = self.dir.join(staging_dir_name(epoch));
        // A leftover from a backup that crashed mid-transfer: it was never
        // committed, so it carries nothing worth keeping.
        match fs::remove_dir_all(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        fs::create_dir(&staging)?;
        self.delta = Some(Delta {
            series: series.to_owned(),
            epoch,
            parent,
            announced_files: files,
            announced_bytes: total_bytes,
            staging,
            completed: HashSet::new(),
            current: None,
            files: 0,
            bytes: 0,
            ended: false,
        });
        Ok(())
    }

    fn chunk(&mut self, epoch: u64, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        let d = self
            .delta
            .as_mut()
            .ok_or_else(|| violation("FileChunk before DeltaBegin"))?;
        if d.ended {
            return Err(violation("FileChunk after DeltaEnd"));
        }
        if epoch != d.epoch {
            return Err(violation(format!(
                "FileChunk for epoch {epoch} during epoch {}",
                d.epoch
            )));
        }
        // Messages decoded off the wire were checked already; this guards
        // messages built in-process.
        check_file_name(name).map_err(violation)?;

        // Checked against the announcement before writing, so a peer cannot
        // fill the disk beyond what it declared up front.
        let len = data.len() as u64;
        let bytes = d
            .bytes
            .checked_add(len)
            .filter(|b| *b <= d.announced_bytes)
            .ok_or_else(|| {
                violation(format!(
                    "more than the announced {} bytes",
                    d.announced_bytes
                ))
            })?;

        let same_file = d.current.as_ref().is_some_and(|c| c.name == name);
        if same_file {
            let Some(cur) = d.current.as_mut() else {
                unreachable!("same_file implies an open file")
            };
            if offset != cur.next_offset {
                return Err(violation(format!(
                    "chunk of {name} at offset {offset}, expected {}",
                    cur.next_offset
                )));
            }
        } else {
            if d.completed.contains(name) {
                return Err(violation(format!(
                    "file {name} sent again after it was complete"
                )));
            }
            if offset != 0 {
                return Err(violation(format!(
                    "first chunk of {name} at offset {offset}, expected 0"
                )));
            }
            if d.files >= d.announced_files {
                return Err(violation(format!(
                    "more than the announced {} files",
                    d.announced_files
                )));
            }
            if let Some(prev) = d.current.take() {
                d.completed.insert(prev.name);
            }
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(d.staging.join(name))?;
            d.files += 1;
            d.current = Some(OpenFile {
                name: name.to_owned(),
                file,
                next_offset: 0,
            });
        }
        let Some(cur) = d.current.as_mut() else {
            unreachable!("a file was opened above")
        };
        cur.file.write_all(data)?;
        cur.next_offset += len;
        d.bytes = bytes;
        Ok(())
    }

    fn end(&mut self, epoch: u64, files: u32, total_bytes: u64) -> Result<()> {
        let d = self
            .delta
            .as_mut()
            .ok_or_else(|| violation("DeltaEnd before DeltaBegin"))?;
        if d.ended {
            return Err(violation("second DeltaEnd"));
        }
        if epoch != d.epoch {
            return Err(violation(format!(
                "DeltaEnd for epoch {epoch} during epoch {}",
                d.epoch
            )));
        }
        if files != d.announced_files || files != d.files {
            return Err(violation(format!(
                "file count mismatch: DeltaBegin announced {}, DeltaEnd says {files}, received {}",
                d.announced_files, d.files
            )));
        }
        if total_bytes != d.announced_bytes || total_bytes != d.bytes {
            return Err(violation(format!(
                "byte count mismatch: DeltaBegin announced {}, DeltaEnd says {total_bytes}, received {}",
                d.announced_bytes, d.bytes
            )));
        }
        if let Some(prev) = d.current.take() {
            d.completed.insert(prev.name);
        }
        d.ended = true;
        Ok(())
    }

    fn commit(&mut self) -> Result<PathBuf> {
        let d = self
            .delta
            .as_ref()
            .ok_or_else(|| violation("finish before DeltaBegin"))?;
        if !d.ended {
            return Err(violation(format!(
                "finish before DeltaEnd of epoch {}",
                d.epoch
            )));
        }
        let final_path = self.dir.join(epoch_dir_name(d.epoch));
        // rename(2) would happily replace an empty directory that appeared
        // meanwhile; a committed epoch must never be replaced.
        if final_path.symlink_metadata().is_ok() {
            return Err(violation(format!(
                "epoch {} appeared at {} during the transfer",
                d.epoch,
                final_path.display()
            )));
        }
        fs::rename(&d.staging, &final_path)?;
        self.delta = None;
        Ok(final_path)
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn violation(reason: impl Into<String>) -> WireError {
    WireError::Stage(reason.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TempDir;

    /// A scratch directory to stage checkpoints in.
    fn stage_dir(tag: &str) -> TempDir {
        TempDir::new("stage", tag)
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn begin(epoch: u64, files: u32, total_bytes: u64) -> Message {
        Message::DeltaBegin {
            series: "s".into(),
            epoch,
            parent: epoch.checked_sub(1),
            files,
            total_bytes,
        }
    }

    fn chunk(epoch: u64, name: &str, offset: u64, data: &[u8]) -> Message {
        Message::FileChunk {
            epoch,
            name: name.into(),
            offset,
            data: data.to_vec(),
        }
    }

    fn end(epoch: u64, files: u32, total_bytes: u64) -> Message {
        Message::DeltaEnd {
            epoch,
            files,
            total_bytes,
        }
    }

    /// A committed epoch 1 that every failure must leave untouched.
    fn with_previous(tag: &str) -> TempDir {
        let t = stage_dir(tag);
        let prev = t.0.join("00000001");
        fs::create_dir(&prev).unwrap();
        fs::write(prev.join("pages.img"), b"old").unwrap();
        t
    }

    fn assert_only_previous(t: &TempDir) {
        assert_eq!(listing(&t.0), vec!["00000001"]);
        assert_eq!(fs::read(t.0.join("00000001/pages.img")).unwrap(), b"old");
    }

    fn expect_violation(stage: &mut Stage, msg: &Message) {
        match stage.receive(msg) {
            Err(WireError::Stage(_)) => {}
            other => panic!("expected a Stage error for {msg:?}, got {other:?}"),
        }
        assert!(stage.staging_path().is_none());
        assert!(matches!(stage.receive(msg), Err(WireError::Poisoned)));
    }

    #[test]
    fn complete_delta_appears_atomically() {
        let t = with_previous("complete");
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 2, 11)).unwrap();
        s.receive(&chunk(2, "a", 0, b"hello")).unwrap();
        s.receive(&chunk(2, "a", 5, b" world")).unwrap();
        s.receive(&chunk(2, "empty", 0, b"")).unwrap();
        // Nothing under the final name while in transfer, nor once complete
        // but not yet finished.
        assert_eq!(listing(&t.0), vec![".staging-2", "00000001"]);
        assert!(!s.is_complete());
        s.receive(&end(2, 2, 11)).unwrap();
        assert!(s.is_complete());
        assert_eq!(listing(&t.0), vec![".staging-2", "00000001"]);
        let p = s.finish().unwrap();
        assert_eq!(p, t.0.join("00000002"));
        assert_eq!(listing(&t.0), vec!["00000001", "00000002"]);
        assert_eq!(listing(&p), vec!["a", "empty"]);
        assert_eq!(fs::read(p.join("a")).unwrap(), b"hello world");
        assert_eq!(fs::read(p.join("empty")).unwrap(), b"");
    }

    #[test]
    fn empty_delta_is_allowed() {
        let t = stage_dir("emptydelta");
        let mut s = Stage::new(&t.0);
        s.receive(&begin(5, 0, 0)).unwrap();
        s.receive(&end(5, 0, 0)).unwrap();
        let p = s.finish().unwrap();
        assert_eq!(listing(&p), Vec::<String>::new());
        assert_eq!(listing(&t.0), vec!["00000005"]);
    }

    #[test]
    fn abort_leaves_only_previous() {
        let t = with_previous("abort");
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 4)).unwrap();
        s.receive(&chunk(2, "a", 0, b"ab")).unwrap();
        s.abort().unwrap();
        assert_only_previous(&t);
    }

    #[test]
    fn drop_mid_transfer_leaves_only_previous() {
        let t = with_previous("drop");
        {
            let mut s = Stage::new(&t.0);
            s.receive(&begin(2, 2, 8)).unwrap();
            s.receive(&chunk(2, "a", 0, b"abcd")).unwrap();
            s.receive(&chunk(2, "b", 0, b"ab")).unwrap();
        }
        assert_only_previous(&t);
        // Even after DeltaEnd, dropping without finish commits nothing.
        {
            let mut s = Stage::new(&t.0);
            s.receive(&begin(2, 1, 1)).unwrap();
            s.receive(&chunk(2, "a", 0, b"x")).unwrap();
            s.receive(&end(2, 1, 1)).unwrap();
        }
        assert_only_previous(&t);
    }

    #[test]
    fn stale_staging_dir_is_replaced() {
        let t = with_previous("stale");
        fs::create_dir(t.0.join(".staging-2")).unwrap();
        fs::write(t.0.join(".staging-2/junk"), b"j").unwrap();
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 1)).unwrap();
        s.receive(&chunk(2, "a", 0, b"x")).unwrap();
        s.receive(&end(2, 1, 1)).unwrap();
        let p = s.finish().unwrap();
        assert_eq!(listing(&p), vec!["a"]);
    }

    #[test]
    fn rejects_out_of_order_chunk() {
        let t = with_previous("order");
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 10)).unwrap();
        s.receive(&chunk(2, "a", 0, b"abc")).unwrap();
        expect_violation(&mut s, &chunk(2, "a", 5, b"x"));
        assert_only_previous(&t);
    }

    #[test]
    fn rejects_overlapping_chunk() {
        let t = with_previous("overlap");
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 10)).unwrap();
        s.receive(&chunk(2, "a", 0, b"abc")).unwrap();
        expect_violation(&mut s, &chunk(2, "a", 2, b"x"));
        assert_only_previous(&t);
    }

    #[test]
    fn rejects_first_chunk_not_at_zero() {
        let t = with_previous("nonzero");
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 10)).unwrap();
        expect_violation(&mut s, &chunk(2, "a", 1, b"x"));
        assert_only_previous(&t);
    }

    #[test]
    fn rejects_wrong_epoch() {
        let t = with_previous("epoch");
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 10)).unwrap();
        expect_violation(&mut s, &chunk(3, "a", 0, b"x"));
        assert_only_previous(&t);

        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 0, 0)).unwrap();
        expect_violation(&mut s, &end(3, 0, 0));
        assert_only_previous(&t);
    }

    #[test]
    fn rejects_repeated_file_after_completion() {
        let t = with_previous("repeat");
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 3, 10)).unwrap();
        s.receive(&chunk(2, "a", 0, b"x")).unwrap();
        s.receive(&chunk(2, "b", 0, b"y")).unwrap();
        expect_violation(&mut s, &chunk(2, "a", 0, b"x"));
        assert_only_previous(&t);
    }

    #[test]
    fn rejects_count_mismatches() {
        let t = with_previous("count");
        // Fewer files than announced.
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 2, 1)).unwrap();
        s.receive(&chunk(2, "a", 0, b"x")).unwrap();
        expect_violation(&mut s, &end(2, 2, 1));
        assert_only_previous(&t);
        // DeltaEnd disagrees with DeltaBegin.
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 1)).unwrap();
        s.receive(&chunk(2, "a", 0, b"x")).unwrap();
        expect_violation(&mut s, &end(2, 1, 2));
        assert_only_previous(&t);
        // Fewer bytes than announced.
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 5)).unwrap();
        s.receive(&chunk(2, "a", 0, b"x")).unwrap();
        expect_violation(&mut s, &end(2, 1, 5));
        assert_only_previous(&t);
        // More files than announced, caught on arrival.
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 5)).unwrap();
        s.receive(&chunk(2, "a", 0, b"x")).unwrap();
        expect_violation(&mut s, &chunk(2, "b", 0, b"y"));
        assert_only_previous(&t);
        // More bytes than announced, caught before writing.
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 2)).unwrap();
        s.receive(&chunk(2, "a", 0, b"x")).unwrap();
        expect_violation(&mut s, &chunk(2, "a", 1, b"yz"));
        assert_only_previous(&t);
    }

    #[test]
    fn rejects_protocol_misuse() {
        let t = with_previous("misuse");
        let mut s = Stage::new(&t.0);
        expect_violation(&mut s, &chunk(2, "a", 0, b"x"));

        let mut s = Stage::new(&t.0);
        expect_violation(&mut s, &end(2, 0, 0));

        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 0, 0)).unwrap();
        expect_violation(&mut s, &begin(3, 0, 0));

        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 0, 0)).unwrap();
        expect_violation(&mut s, &Message::Committed { epoch: 2 });

        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 0, 0)).unwrap();
        s.receive(&end(2, 0, 0)).unwrap();
        expect_violation(&mut s, &chunk(2, "a", 0, b""));

        // Committed epochs are never overwritten.
        let mut s = Stage::new(&t.0);
        expect_violation(&mut s, &begin(1, 0, 0));

        // A parent that is not older than the epoch.
        let mut s = Stage::new(&t.0);
        expect_violation(
            &mut s,
            &Message::DeltaBegin {
                series: "s".into(),
                epoch: 2,
                parent: Some(2),
                files: 0,
                total_bytes: 0,
            },
        );
        assert_only_previous(&t);
    }

    #[test]
    fn rejects_unsafe_name_built_in_process() {
        let t = with_previous("name");
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 10)).unwrap();
        expect_violation(&mut s, &chunk(2, "../escape", 0, b"x"));
        assert_only_previous(&t);
        assert!(!t.0.parent().unwrap().join("escape").exists());
    }

    #[test]
    fn finish_before_end_is_refused_and_cleans_up() {
        let t = with_previous("early");
        let mut s = Stage::new(&t.0);
        s.receive(&begin(2, 1, 1)).unwrap();
        s.receive(&chunk(2, "a", 0, b"x")).unwrap();
        assert!(matches!(s.finish(), Err(WireError::Stage(_))));
        assert_only_previous(&t);
    }
}
