//! A minimal `newc` cpio writer: what the kernel unpacks as an initramfs.
//!
//! Entries carry fixed owners (root) and a fixed mtime so the same inputs give the same
//! archive, byte for byte.

use std::io::{self, Write};

/// One archive entry.
#[derive(Debug)]
pub enum Entry<'a> {
    /// A directory.
    Dir { path: &'a str, mode: u32 },
    /// A regular file with its contents.
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    /// A character device node (e.g. `/dev/console`, needed before devtmpfs is mounted).
    CharDev {
        path: &'a str,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// Writes newc entries to an inner writer; call [`CpioWriter::finish`] to add the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn header(
        &mut self,
        path: &str,
        mode: u32,
        size: usize,
        rdev: (u32, u32),
        nlink: u32,
    ) -> io::Result<()> {
        let name_len = path.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_len, 0
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(path.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    /// Appends one entry.
    pub fn add(&mut self, entry: &Entry<'_>) -> io::Result<()> {
        match *entry {
            Entry::Dir { path, mode } => self.header(path, 0o040000 | mode, 0, (0, 0), 2),
            Entry::File { path, mode, data } => {
                self.header(path, 0o100000 | mode, data.len(), (0, 0), 1)?;
                self.put(data)?;
                self.pad()
            }
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => self.header(path, 0o020000 | mode, 0, (major, minor), 1),
        }
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.ino = 0;
        self.header("TRAILER!!!", 0, 0, (0, 0), 1)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut w = CpioWriter::new(Vec::new());
        w.add(&Entry::Dir {
            path: "dev",
            mode: 0o755,
        })
        .expect("dir");
        w.add(&Entry::File {
            path: "init",
            mode: 0o755,
            data: b"hello",
        })
        .expect("file");
        let out = w.finish().expect("finish");
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
        // Header of "init": regular file, mode 0755, size 5.
        let at = text.find("init\0").expect("name") - 110;
        assert_eq!(&text[at + 14..at + 22], "000081ed");
        assert_eq!(&text[at + 54..at + 62], "00000005");
    }
}
