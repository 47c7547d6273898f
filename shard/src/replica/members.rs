//! Keeping `MEMBERS` ([`crate::members`]) in step with the log: the replica tracks the
//! membership on disk and the conf entries of its log above it, and folds in those that are
//! committed and durable here whenever it hands out a write. Only committed and durable ones:
//! a file naming a configuration that a crash could take out of the log would outlive it.
//!
//! The invariant the deletions rely on: every conf entry below the log's first retained LSN is
//! folded into the file on disk (a segment is retired only once a committed entry after it is
//! applied, and applied means committed and durable, so the write that deletes it folds it in
//! first, in its step 0).

use std::collections::VecDeque;

use super::Replica;
use crate::members::MembersFile;
use crate::raft::{ConfChange, Membership};

#[derive(Debug)]
pub(super) struct MembersTrack {
    /// What `MEMBERS` holds (index 0: no file; the group's voters at creation).
    on_disk: MembersFile,
    /// The file the write in flight carries.
    in_write: Option<MembersFile>,
    /// Conf entries of the log above `on_disk.index`, in order.
    conf: VecDeque<(u64, ConfChange)>,
}

impl MembersTrack {
    pub(super) fn new(on_disk: MembersFile, log_conf: &[(u64, ConfChange)]) -> MembersTrack {
        let above = on_disk.index;
        MembersTrack {
            on_disk,
            in_write: None,
            conf: log_conf.iter().filter(|c| c.0 > above).copied().collect(),
        }
    }

    /// The membership on disk with the conf entries through `through` applied.
    pub(super) fn at(&self, through: u64) -> Membership {
        fold(
            &self.on_disk.membership,
            self.conf.iter().filter(|c| c.0 <= through),
        )
    }

    pub(super) fn appended(&mut self, index: u64, cc: Option<ConfChange>) {
        debug_assert!(self.conf.back().is_none_or(|c| c.0 < index));
        if let Some(cc) = cc.filter(|_| index > self.on_disk.index) {
            self.conf.push_back((index, cc));
        }
    }

    /// The log was cut from `from` (an uncommitted suffix: never below what is folded).
    pub(super) fn truncated(&mut self, from: u64) {
        debug_assert!(
            from > self.on_disk.index,
            "a cut below a committed configuration"
        );
        self.conf.retain(|c| c.0 < from);
    }

    /// A snapshot replaced the log: its membership goes to disk with the install write.
    pub(super) fn reset(&mut self, file: MembersFile) -> MembersFile {
        self.conf.clear();
        self.in_write = Some(file.clone());
        file
    }

    /// The file to write now, if the conf entries committed and durable through `through`
    /// change what is on disk. Conf entries that change nothing are folded without a write.
    pub(super) fn due(&mut self, shard: u32, through: u64) -> Option<MembersFile> {
        if self.in_write.is_some() || self.conf.front().is_none_or(|c| c.0 > through) {
            return None;
        }
        let index = self.conf.iter().take_while(|c| c.0 <= through).last()?.0;
        let membership = self.at(index);
        let file = MembersFile {
            shard,
            index,
            membership,
        };
        if file.membership == self.on_disk.membership {
            self.on_disk.index = index;
            self.conf.retain(|c| c.0 > index);
            return None;
        }
        self.in_write = Some(file.clone());
        Some(file)
    }

    /// The write carrying the file is durable.
    pub(super) fn written(&mut self) {
        if let Some(f) = self.in_write.take() {
            self.conf.retain(|c| c.0 > f.index);
            self.on_disk = f;
        }
    }

    /// The first conf entry not folded into the file on disk.
    pub(super) fn first_unfolded(&self) -> Option<u64> {
        self.conf.front().map(|c| c.0)
    }
}

/// `base` with `changes` applied in order (one that does not apply changes nothing, as in the
/// core: a change the log holds was valid when it was appended).
pub(super) fn fold<'a>(
    base: &Membership,
    changes: impl IntoIterator<Item = &'a (u64, ConfChange)>,
) -> Membership {
    changes
        .into_iter()
        .fold(base.clone(), |m, (_, cc)| m.apply(*cc).unwrap_or(m))
}

impl Replica {
    /// Step 0 of the write being handed out: `MEMBERS`, when the committed and durable conf
    /// entries changed the membership.
    pub(super) fn members_for_write(&mut self) -> Option<MembersFile> {
        if self.planted.members_not_persisted {
            return None;
        }
        let through = self.raft.commit().min(self.durable_through());
        let file = self.members.due(self.shard.config.shard, through);
        // Nothing below the log's start may be left unfolded: its entry is about to go.
        debug_assert!(
            file.is_some()
                || self
                    .members
                    .first_unfolded()
                    .is_none_or(|i| i >= self.shard.log_start()),
            "a conf entry below the retained log is not in MEMBERS"
        );
        file
    }
}
