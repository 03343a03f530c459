//! What a VM prints is the guest's choice, and the guest may be hostile: escape
//! sequences written to the operator's terminal can set its title, move the cursor to
//! overwrite what was shown, redefine keys on some terminals, or write the clipboard
//! (OSC 52). On a terminal, `vm logs` and `vm exec` output goes through a
//! [`Neutralizer`] unless `--raw`: every control character but newline, carriage
//! return and tab is shown as text (`\x1b`, `\u{9b}`), and bytes that are not UTF-8
//! as `\xNN`. Pipes and files get the bytes unchanged, so scripts see what the guest
//! wrote.

use std::io::IsTerminal;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;

/// Streaming: a UTF-8 sequence split across two writes is decoded whole.
#[derive(Debug, Default)]
pub struct Neutralizer {
    /// The start of a UTF-8 sequence the last input ended in (at most 3 bytes).
    pending: Vec<u8>,
}

impl Neutralizer {
    /// Appends `input`, neutralised, to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let joined;
        let mut rest: &[u8] = if self.pending.is_empty() {
            input
        } else {
            self.pending.extend_from_slice(input);
            joined = std::mem::take(&mut self.pending);
            &joined
        };
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    push_text(text, out);
                    return;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // SAFETY-free: `valid_up_to` bytes are UTF-8 by definition.
                    push_text(std::str::from_utf8(valid).unwrap_or_default(), out);
                    match e.error_len() {
                        // Incomplete at the end: wait for the rest.
                        None => {
                            self.pending = after.to_vec();
                            return;
                        }
                        Some(n) => {
                            for b in &after[..n] {
                                push_escaped_byte(*b, out);
                            }
                            rest = &after[n..];
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: a sequence left incomplete is shown as bytes.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        for b in std::mem::take(&mut self.pending) {
            push_escaped_byte(b, out);
        }
    }

    /// `input` neutralised, as one whole stream.
    #[cfg(test)]
    pub fn all(input: &[u8]) -> Vec<u8> {
        let mut n = Self::default();
        let mut out = Vec::with_capacity(input.len());
        n.feed(input, &mut out);
        n.finish(&mut out);
        out
    }
}

/// Whether `c` is shown as an escape rather than sent to the terminal: C0 controls but
/// `\n`, `\r`, `\t`; DEL; C1 controls (U+0080–U+009F, e.g. U+009B, a one-character
/// CSI); and the bidirectional overrides and isolates, which reorder what is shown.
fn is_control(c: char) -> bool {
    (c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_text(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        if !is_control(c) {
            let mut b = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
        } else if (c as u32) < 0x80 {
            out.extend_from_slice(format!("\\x{:02x}", c as u32).as_bytes());
        } else {
            out.extend_from_slice(format!("\\u{{{:x}}}", c as u32).as_bytes());
        }
    }
}

fn push_escaped_byte(b: u8, out: &mut Vec<u8>) {
    out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
}

/// Whether output to this stream is neutralised: on a terminal, unless `raw`.
pub fn neutralise(stream: &impl IsTerminal, raw: bool) -> bool {
    !raw && stream.is_terminal()
}

/// An [`AsyncWrite`] that neutralises what it passes on when `on`, and passes bytes
/// through unchanged otherwise.
#[derive(Debug)]
pub struct SafeWriter<W> {
    inner: W,
    on: bool,
    n: Neutralizer,
    /// Neutralised bytes accepted but not yet written to `inner`.
    out: Vec<u8>,
    written: usize,
}

impl<W: AsyncWrite + Unpin> SafeWriter<W> {
    pub fn new(inner: W, on: bool) -> Self {
        Self {
            inner,
            on,
            n: Neutralizer::default(),
            out: Vec::new(),
            written: 0,
        }
    }

    /// Writes out what was accepted; ready when nothing is left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SafeWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !this.on {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        ready!(this.poll_drain(cx))?;
        let mut out = std::mem::take(&mut this.out);
        this.n.feed(buf, &mut out);
        this.out = out;
        // Best effort now; whatever is left goes out on the next write or flush.
        let _ = this.poll_drain(cx)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.on && this.out.is_empty() {
            let mut out = Vec::new();
            this.n.finish(&mut out);
            this.out = out;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(input: &[u8]) -> String {
        String::from_utf8(Neutralizer::all(input)).expect("the output is UTF-8")
    }

    #[test]
    fn hostile_sequences_are_shown_as_text() {
        // OSC 52: write "pwned" to the operator's clipboard (BEL- and ST-terminated).
        assert_eq!(shown(b"\x1b]52;c;cHduZWQ=\x07"), "\\x1b]52;c;cHduZWQ=\\x07");
        assert_eq!(
            shown(b"\x1b]52;c;cHduZWQ=\x1b\\"),
            "\\x1b]52;c;cHduZWQ=\\x1b\\"
        );
        // Window title.
        assert_eq!(shown(b"\x1b]0;root@prod\x07"), "\\x1b]0;root@prod\\x07");
        // CSI cursor moves and erase: overwrite what the operator already saw.
        assert_eq!(
            shown(b"ok\x1b[2A\x1b[2K\x1b[1;1Hfake prompt $ "),
            "ok\\x1b[2A\\x1b[2K\\x1b[1;1Hfake prompt $ "
        );
        // C1 controls: a one-character CSI (U+009B) and OSC (U+009D) in UTF-8, and the
        // raw 8-bit bytes some terminals take for them.
        assert_eq!(
            shown("\u{9b}2J\u{9d}0;t\u{9c}".as_bytes()),
            "\\u{9b}2J\\u{9d}0;t\\u{9c}"
        );
        assert_eq!(shown(b"\x9b2J"), "\\x9b2J");
        // A right-to-left override that would show "exe.txt" for "txt.exe".
        assert_eq!(shown("a\u{202e}txt.exe".as_bytes()), "a\\u{202e}txt.exe");
        // Other C0 controls and DEL.
        assert_eq!(shown(b"a\x00b\x08c\x7fd\x0ee"), "a\\x00b\\x08c\\x7fd\\x0ee");
    }

    #[test]
    fn text_newlines_tabs_and_utf8_pass_unchanged() {
        let text = "line 1\r\n\tcolumn — é ü 日本 🦀\nend";
        assert_eq!(shown(text.as_bytes()), text);
    }

    #[test]
    fn a_sequence_split_across_writes_is_decoded_whole() {
        let input = "é🦀\u{9b}".as_bytes();
        for cut in 0..=input.len() {
            let mut n = Neutralizer::default();
            let mut out = Vec::new();
            n.feed(&input[..cut], &mut out);
            n.feed(&input[cut..], &mut out);
            n.finish(&mut out);
            assert_eq!(
                String::from_utf8(out).expect("utf8"),
                "é🦀\\u{9b}",
                "cut {cut}"
            );
        }
        // A stream that ends inside a sequence shows its bytes.
        assert_eq!(shown(&"🦀".as_bytes()[..2]), "\\xf0\\x9f");
    }

    #[tokio::test]
    async fn the_writer_neutralises_only_when_on() {
        use tokio::io::AsyncWriteExt;
        let hostile = b"\x1b]52;c;eA==\x07hi\n";
        let mut on = SafeWriter::new(Vec::new(), true);
        for b in hostile.chunks(3) {
            on.write_all(b).await.expect("write");
        }
        on.shutdown().await.expect("shutdown");
        assert_eq!(on.inner, b"\\x1b]52;c;eA==\\x07hi\n");
        let mut off = SafeWriter::new(Vec::new(), false);
        off.write_all(hostile).await.expect("write");
        off.flush().await.expect("flush");
        assert_eq!(off.inner, hostile, "raw bytes when off");
    }
}
