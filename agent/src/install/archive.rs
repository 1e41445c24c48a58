//! Reading a `files` artifact (a tar, optionally zstd-compressed) and checking every
//! entry on its own and against the others, before anything on the host changes.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flotilla_proto::manifest::Compression;
use tar::EntryType;

use super::plan::TMP_SUFFIX;
use super::{InstallError, MAX_TAR_ENTRIES};

/// Longest file name most Linux filesystems take (NAME_MAX).
const NAME_MAX: usize = 255;
/// Longest path the kernel takes (PATH_MAX).
const PATH_MAX: usize = 4096;

/// One entry that will be installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TarEntry {
    /// The name as the archive spells it, for messages.
    pub name: String,
    /// Normalised path relative to the destination: no `.`, `..`, empty or root parts.
    pub rel: PathBuf,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Dir { mode: u32 },
    File { mode: u32, size: u64 },
    Symlink { target: PathBuf },
}

/// A fresh reader over the artifact from its first byte. The caller keeps one open
/// file for both passes, so replacing the artifact's path in between changes nothing.
pub(crate) fn open<'a>(
    file: &File,
    compression: Compression,
    artifact: &'a Path,
) -> Result<tar::Archive<Box<dyn Read + 'a>>, InstallError> {
    let err = |source| InstallError::Archive {
        artifact: artifact.to_path_buf(),
        source,
    };
    let mut f = file.try_clone().map_err(err)?;
    f.seek(SeekFrom::Start(0)).map_err(err)?;
    let buffered = BufReader::new(f);
    let reader: Box<dyn Read + 'a> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(buffered).map_err(err)?;
            // The frame says how much window it needs, and the decoder would
            // allocate up to 128 MiB for it: bounded here, so the agent stays
            // small whatever an artifact says.
            d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(err)?;
            Box::new(d)
        }
    };
    Ok(tar::Archive::new(reader))
}

/// Largest zstd window an artifact may need: 2^25 (32 MiB), what every
/// compression level up to 19 uses; `--long` and `--ultra` frames need more.
pub(crate) const ZSTD_WINDOW_LOG_MAX: u32 = 25;

/// Longest GNU long name or long link (`L`, `K`) taken: a path the kernel
/// takes, and its NUL.
const MAX_LONG_NAME: u64 = PATH_MAX as u64 + 1;
/// Largest pax extension header (`x`, `g`) taken.
const MAX_PAX_HEADER: u64 = 64 * 1024;
/// Headers read in the raw pass: each entry, and up to three extension headers
/// in front of it.
const MAX_RAW_HEADERS: usize = MAX_TAR_ENTRIES * 4;

/// Reads the archive's raw headers once before anything else does. The tar
/// crate's own iteration reads a long-name, long-link or pax header whole into
/// memory, however large its header says it is; here each one's declared size
/// is checked against its bound before a byte of it is read, and a pax `size`
/// (which the tar crate uses in place of the header's) must agree with the
/// header, so this pass and the later ones see the same entries.
fn check_extension_headers(
    file: &File,
    compression: Compression,
    artifact: &Path,
) -> Result<(), InstallError> {
    let err = |source: std::io::Error| {
        // zstd's words for a frame whose window is past the bound.
        if source.to_string().contains("too much memory") {
            InstallError::ZstdWindowTooLarge {
                artifact: artifact.to_path_buf(),
                max_mib: (1u64 << ZSTD_WINDOW_LOG_MAX) >> 20,
            }
        } else {
            InstallError::Archive {
                artifact: artifact.to_path_buf(),
                source,
            }
        }
    };
    let mut archive = open(file, compression, artifact)?;
    let mut pax_size: Option<u64> = None;
    for (n, entry) in archive.entries().map_err(err)?.raw(true).enumerate() {
        if n >= MAX_RAW_HEADERS {
            return Err(InstallError::TooManyEntries {
                limit: MAX_TAR_ENTRIES,
            });
        }
        let mut entry = entry.map_err(err)?;
        let etype = entry.header().entry_type();
        let size = entry.header().entry_size().map_err(err)?;
        let (kind, limit) = match etype {
            EntryType::GNULongName => ("GNU long name", MAX_LONG_NAME),
            EntryType::GNULongLink => ("GNU long link", MAX_LONG_NAME),
            EntryType::XHeader => ("pax", MAX_PAX_HEADER),
            EntryType::XGlobalHeader => ("pax global", MAX_PAX_HEADER),
            // Entry types the tar crate reads nothing extra for (the ones
            // refused are refused by name in `classify`). Any other is refused
            // here, before the tar crate's own pass: a GNU sparse header's
            // extension blocks, for one, would be read into a list however
            // many there are.
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Char
            | EntryType::Block
            | EntryType::Fifo => {
                if let Some(pax) = pax_size.take()
                    && pax != size
                {
                    return Err(InstallError::PaxSizeMismatch { pax, header: size });
                }
                continue;
            }
            other => {
                let name = entry.header().path_bytes();
                return Err(InstallError::UnsupportedEntry {
                    entry: String::from_utf8_lossy(&name).into_owned(),
                    kind: match other {
                        EntryType::GNUSparse => "GNU sparse file".into(),
                        other => format!("{:?}", char::from(other.as_byte())),
                    },
                });
            }
        };
        if size > limit {
            return Err(InstallError::ExtensionHeaderTooLarge { kind, size, limit });
        }
        if etype == EntryType::XHeader {
            let mut data = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut data).map_err(err)?;
            pax_size = pax_size_record(&data);
        }
    }
    Ok(())
}

/// The pax `size` record as the tar crate reads it: the first `size` key, if
/// the records up to it parse and its value is a number.
fn pax_size_record(data: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.ok()?;
        if ext.key() == Ok("size") {
            return ext.value().ok()?.parse().ok();
        }
    }
    None
}

/// First pass: every entry checked, the whole list checked, nothing written.
pub(crate) fn read_entries(
    file: &File,
    compression: Compression,
    artifact: &Path,
    max_bytes: u64,
    destination: &Path,
) -> Result<Vec<TarEntry>, InstallError> {
    let err = |source| InstallError::Archive {
        artifact: artifact.to_path_buf(),
        source,
    };
    check_extension_headers(file, compression, artifact)?;
    let mut archive = open(file, compression, artifact)?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut count = 0usize;
    let mut total = 0u64;
    for entry in archive.entries().map_err(err)? {
        let entry = entry.map_err(err)?;
        count += 1;
        if count > MAX_TAR_ENTRIES {
            return Err(InstallError::TooManyEntries {
                limit: MAX_TAR_ENTRIES,
            });
        }
        let Some(t) = classify(&entry, artifact)? else {
            continue;
        };
        if let EntryKind::File { size, .. } = t.kind {
            total = total.saturating_add(size);
            if total > max_bytes {
                return Err(InstallError::TooLarge { limit: max_bytes });
            }
        }
        if !seen.insert(t.rel.clone()) {
            return Err(InstallError::DuplicateEntry { entry: t.name });
        }
        out.push(t);
    }
    check_structure(&out, destination)?;
    Ok(out)
}

/// What one archive entry is, or None for entries that install nothing (a pax
/// global header, the `./` entry of the destination itself).
pub(crate) fn classify<R: Read>(
    entry: &tar::Entry<'_, R>,
    artifact: &Path,
) -> Result<Option<TarEntry>, InstallError> {
    let raw = entry.path_bytes();
    let lossy = String::from_utf8_lossy(&raw).into_owned();
    let etype = entry.header().entry_type();
    if etype == EntryType::XGlobalHeader {
        return Ok(None);
    }
    let Ok(name) = std::str::from_utf8(&raw) else {
        return Err(InstallError::NonUtf8Entry { entry: lossy });
    };
    let name = name.to_owned();
    let special = |kind| InstallError::SpecialEntry {
        entry: name.clone(),
        kind,
    };
    match etype {
        EntryType::Char => return Err(special("character device")),
        EntryType::Block => return Err(special("block device")),
        EntryType::Fifo => return Err(special("fifo")),
        EntryType::Link => {
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .unwrap_or_default();
            return Err(InstallError::HardlinkEntry {
                entry: name,
                target,
            });
        }
        _ => {}
    }
    let rel = normalize(&name)?;
    // setuid/setgid never come from an artifact; the rest of the mode does.
    let mode = || -> Result<u32, InstallError> {
        let m = entry
            .header()
            .mode()
            .map_err(|source| InstallError::Archive {
                artifact: artifact.to_path_buf(),
                source,
            })?;
        Ok(m & 0o1777)
    };
    let kind = match etype {
        EntryType::Regular | EntryType::Continuous => EntryKind::File {
            mode: mode()?,
            size: entry.size(),
        },
        EntryType::Directory => EntryKind::Dir { mode: mode()? },
        EntryType::Symlink => EntryKind::Symlink {
            target: symlink_target(entry, &name)?,
        },
        EntryType::GNUSparse => {
            return Err(InstallError::UnsupportedEntry {
                entry: name,
                kind: "GNU sparse file".into(),
            });
        }
        other => {
            return Err(InstallError::UnsupportedEntry {
                entry: name,
                kind: format!("{:?}", char::from(other.as_byte())),
            });
        }
    };
    if rel.as_os_str().is_empty() {
        // `./` is the destination itself, which keeps its own mode and owner.
        if matches!(kind, EntryKind::Dir { .. }) {
            return Ok(None);
        }
        return Err(InstallError::InvalidEntryName {
            entry: name,
            reason: "it names the destination itself",
        });
    }
    Ok(Some(TarEntry { name, rel, kind }))
}

/// `./a//b/` becomes `a/b`; absolute names, `..`, NUL bytes, our temp suffix and
/// names the filesystem cannot hold (with our temp suffix added) are refused.
fn normalize(name: &str) -> Result<PathBuf, InstallError> {
    let entry = || name.to_owned();
    if name.starts_with('/') {
        return Err(InstallError::AbsoluteEntry { entry: entry() });
    }
    if name.contains('\0') {
        return Err(InstallError::InvalidEntryName {
            entry: entry(),
            reason: "it contains a NUL byte",
        });
    }
    if name.len() > PATH_MAX {
        return Err(InstallError::NameTooLong { entry: entry() });
    }
    let mut rel = PathBuf::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(InstallError::ParentDirEntry { entry: entry() }),
            p if p.len() + 1 + TMP_SUFFIX.len() > NAME_MAX => {
                return Err(InstallError::NameTooLong { entry: entry() });
            }
            p if p.ends_with(TMP_SUFFIX) => {
                return Err(InstallError::ReservedName { entry: entry() });
            }
            p => rel.push(p),
        }
    }
    Ok(rel)
}

fn symlink_target<R: Read>(entry: &tar::Entry<'_, R>, name: &str) -> Result<PathBuf, InstallError> {
    let bytes = entry.link_name_bytes().unwrap_or_default();
    let Ok(target) = std::str::from_utf8(&bytes) else {
        return Err(InstallError::NonUtf8Entry {
            entry: format!("{name} (symlink target)"),
        });
    };
    if target.is_empty() {
        return Err(InstallError::SymlinkEmpty {
            entry: name.to_owned(),
        });
    }
    if target.starts_with('/') {
        return Err(InstallError::SymlinkAbsolute {
            entry: name.to_owned(),
            target: target.to_owned(),
        });
    }
    // `..` only as a leading run: `../../x` resolves where it reads from the
    // link's own directory (whose parts are directories: nothing is installed
    // through a symlink), while in `s/../x` the name `s` may be, or later
    // become, a symlink, and the link would lead somewhere else than checked.
    let mut named = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if named => {
                return Err(InstallError::SymlinkParentAfterName {
                    entry: name.to_owned(),
                    target: target.to_owned(),
                });
            }
            ".." => {}
            _ => named = true,
        }
    }
    if target.contains('\0') || target.len() > PATH_MAX {
        return Err(InstallError::InvalidEntryName {
            entry: name.to_owned(),
            reason: "its symlink target has a NUL byte or is too long",
        });
    }
    Ok(PathBuf::from(target))
}

/// Checks that need the whole list: nothing lies under an entry that is not a
/// directory, and every symlink resolves (lexically, from its own directory) inside
/// the destination.
fn check_structure(entries: &[TarEntry], destination: &Path) -> Result<(), InstallError> {
    let kinds: HashMap<&Path, &EntryKind> =
        entries.iter().map(|e| (e.rel.as_path(), &e.kind)).collect();
    for e in entries {
        for ancestor in e.rel.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            if let Some(kind) = kinds.get(ancestor)
                && !matches!(kind, EntryKind::Dir { .. })
            {
                return Err(InstallError::EntryUnderNonDirectory {
                    entry: e.name.clone(),
                    parent: ancestor.display().to_string(),
                });
            }
        }
        if let EntryKind::Symlink { target } = &e.kind {
            check_symlink(e, target, &kinds, destination)?;
        }
    }
    Ok(())
}

fn check_symlink(
    e: &TarEntry,
    target: &Path,
    kinds: &HashMap<&Path, &EntryKind>,
    destination: &Path,
) -> Result<(), InstallError> {
    let text = target.to_string_lossy();
    let mut at: PathBuf = e.rel.parent().map(Path::to_path_buf).unwrap_or_default();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if at.as_os_str().is_empty() {
                    return Err(InstallError::SymlinkEscapes {
                        entry: e.name.clone(),
                        target: text.into_owned(),
                    });
                }
                // `..` after a symlink climbs from wherever that link points, not
                // from here: the lexical answer would be wrong, so refuse it.
                let via_link = matches!(kinds.get(at.as_path()), Some(EntryKind::Symlink { .. }))
                    || fs::symlink_metadata(destination.join(&at))
                        .is_ok_and(|m| m.file_type().is_symlink());
                if via_link {
                    return Err(InstallError::SymlinkThroughSymlink {
                        entry: e.name.clone(),
                        target: text.into_owned(),
                        via: at.display().to_string(),
                    });
                }
                at.pop();
            }
            p => at.push(p),
        }
    }
    Ok(())
}
