//! The small matchers the framing tracker feeds one byte at a time, without
//! allocating: a name against a few candidates, the value of a framing
//! header, the last `Transfer-Encoding` token.

const CHUNKED: &[u8] = b"chunked";

/// Incremental, allocation-free comparison of a name against a few
/// candidates, one bit per candidate still matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NameMatch {
    pub(super) len: u8,
    candidates: u8,
}

impl Default for NameMatch {
    fn default() -> Self {
        Self {
            len: 0,
            candidates: u8::MAX,
        }
    }
}

impl NameMatch {
    pub(super) fn advance(self, names: &[&[u8]], byte: u8) -> Self {
        let position = usize::from(self.len);
        let mut candidates = self.candidates;
        for (bit, name) in names.iter().enumerate() {
            if name.get(position) != Some(&byte) {
                candidates &= !(1 << bit);
            }
        }
        Self {
            len: self.len.saturating_add(1),
            candidates,
        }
    }

    /// True when no name can match any more.
    pub(super) fn matches_none(self, names: &[&[u8]]) -> bool {
        let all = (1u16 << names.len()) - 1;
        u16::from(self.candidates) & all == 0
    }

    pub(super) fn matched(self, names: &[&[u8]]) -> Option<usize> {
        names.iter().enumerate().find_map(|(bit, name)| {
            (self.candidates & (1 << bit) != 0 && name.len() == usize::from(self.len))
                .then_some(bit)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ValueParser {
    Ignored,
    /// The value does not matter, only that the header is there.
    Upgrade,
    /// hyper takes the trimmed value as plain decimal digits, no sign, no
    /// list.
    ContentLength {
        value: u64,
        has_digits: bool,
        after_digits: bool,
    },
    /// Only the last comma-separated token matters, as in hyper.
    TransferEncoding(TokenMatch),
}

impl ValueParser {
    pub(super) fn advance(self, byte: u8) -> Option<Self> {
        match self {
            Self::Ignored => Some(Self::Ignored),
            Self::Upgrade => Some(Self::Upgrade),
            Self::ContentLength {
                value,
                has_digits,
                after_digits,
            } => match byte {
                b' ' | b'\t' => Some(Self::ContentLength {
                    value,
                    has_digits,
                    after_digits: has_digits,
                }),
                b'0'..=b'9' if !after_digits => Some(Self::ContentLength {
                    value: value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?,
                    has_digits: true,
                    after_digits: false,
                }),
                _ => None,
            },
            Self::TransferEncoding(token) => Some(Self::TransferEncoding(token.advance(byte))),
        }
    }
}

/// Whether the current comma-separated token, trimmed, is `chunked`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct TokenMatch {
    matched: u8,
    started: bool,
    ended: bool,
    mismatch: bool,
}

impl TokenMatch {
    pub(super) fn advance(self, byte: u8) -> Self {
        match byte {
            b',' => Self::default(),
            b' ' | b'\t' => Self {
                ended: self.started,
                ..self
            },
            _ => {
                let position = usize::from(self.matched);
                let continues = !self.ended
                    && !self.mismatch
                    && CHUNKED.get(position) == Some(&byte.to_ascii_lowercase());
                Self {
                    matched: if continues {
                        self.matched.saturating_add(1)
                    } else {
                        self.matched
                    },
                    started: true,
                    ended: false,
                    mismatch: !continues,
                }
            }
        }
    }

    pub(super) fn is_chunked(self) -> bool {
        !self.mismatch && usize::from(self.matched) == CHUNKED.len()
    }
}

pub(super) fn is_control(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7F
}
