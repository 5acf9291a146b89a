//! Buffer sharing by liveness over the whole plan (for a training plan: the whole step, forward,
//! backward and gradients).
//!
//! Every value a dispatch writes lives from that dispatch to the last dispatch that reads it, both
//! inclusive; a value the host reads after the run (an `Output`: loss, gradients, metrics) lives to
//! the end of the plan. Two values may share a buffer when their lifetimes are disjoint and they have
//! the same dtype, with one exception: a transient f16 value may live in an f32 buffer. A buffer's
//! dtype is what the host decodes it by (readbacks of outputs, the NaN diagnosis): f16 pairs read as
//! f32 are non-finite only where the upper half is an f16 NaN, so the diagnosis never reports a false
//! NaN, while f32 bits read as f16 pairs could; hence a buffer holding any f32 value is an f32 buffer,
//! and an output never shares a buffer of another dtype. So a buffer that so far holds only transient
//! f16 values becomes an f32 buffer when an f32 value joins it: under `precision = f16` the large
//! activations (attention probabilities, expert hidden states) are f16 and are placed before the
//! equally large or slightly smaller f32 gradients, which must still be able to reuse their buffers,
//! or the f16 plan would keep apart what the f32 plan shares and lose much of the halving.
//! Because lifetimes are inclusive, a dispatch never binds one buffer both for a value it reads and a
//! value it writes.
//!
//! The assignment is greedy by size, the shared-object strategy of TFLite's memory planner: values in
//! decreasing size, each into the smallest existing buffer that is free for its whole lifetime, or
//! else a new buffer of its size. Processing large values first means every buffer is as large as its
//! first (largest) value, so the bytes allocated are the sum of those first values, and a gradient
//! can live in the buffer a dead forward activation held (and the other way round).

use crate::ir::DType;

/// One value's request: its size, element type and inclusive lifetime in dispatch indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub size: u64,
    pub dtype: DType,
    pub first: usize,
    pub last: usize,
    /// Only kernels read it (not the host): an f16 one may live in an f32 buffer.
    pub transient: bool,
}

impl Request {
    /// A transient f16 value, the one kind that may live in a buffer of another dtype (f32).
    fn is_guest(&self) -> bool {
        self.transient && self.dtype == DType::F16
    }
}

/// The shared buffers: the size and dtype of each, and for every request the buffer it lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sharing {
    pub sizes: Vec<u64>,
    pub dtypes: Vec<DType>,
    pub buffer_of: Vec<usize>,
}

/// One shared buffer while it is being filled: its size (its first, largest value's), element type,
/// whether it holds only transient f16 values so far (then an f32 value may join and make it f32),
/// and the inclusive lifetimes it holds, sorted by start.
struct Slot {
    size: u64,
    dtype: DType,
    only_guests: bool,
    held: Vec<(usize, usize)>,
}

impl Slot {
    fn fits_dtype(&self, r: &Request) -> bool {
        self.dtype == r.dtype
            || (r.is_guest() && self.dtype == DType::F32)
            || (r.dtype == DType::F32 && self.only_guests)
    }
}

/// Greedy by size (module doc). Buffers are numbered by their earliest value, so the plan reads in
/// dispatch order and the result does not depend on the sort's tie-breaking.
pub(crate) fn share(requests: &[Request]) -> Sharing {
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(requests[i].size), requests[i].first, i));
    let mut slots: Vec<Slot> = Vec::new();
    let mut slot_of = vec![0usize; requests.len()];
    for i in order {
        let r = requests[i];
        let free = |held: &[(usize, usize)]| {
            // First held lifetime ending at or after `r.first`: it must start after `r.last`.
            let k = held.partition_point(|&(_, end)| end < r.first);
            held.get(k).is_none_or(|&(start, _)| start > r.last)
        };
        let best = slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.fits_dtype(&r) && slot.size >= r.size && free(&slot.held))
            .min_by_key(|(s, slot)| (slot.size, *s))
            .map(|(s, _)| s);
        let s = best.unwrap_or_else(|| {
            slots.push(Slot {
                size: r.size,
                dtype: r.dtype,
                only_guests: true,
                held: Vec::new(),
            });
            slots.len() - 1
        });
        let slot = &mut slots[s];
        if r.dtype == DType::F32 {
            slot.dtype = DType::F32;
        }
        slot.only_guests &= r.is_guest();
        let held = &mut slot.held;
        let at = held.partition_point(|&(start, _)| start < r.first);
        held.insert(at, (r.first, r.last));
        slot_of[i] = s;
    }
    // Renumber by each buffer's earliest value (ties: lower request index).
    let mut first_use: Vec<(usize, usize, usize)> = slots
        .iter()
        .enumerate()
        .map(|(s, _)| (usize::MAX, usize::MAX, s))
        .collect();
    for (i, r) in requests.iter().enumerate() {
        let f = &mut first_use[slot_of[i]];
        if (r.first, i) < (f.0, f.1) {
            *f = (r.first, i, f.2);
        }
    }
    first_use.sort();
    let mut renumber = vec![0usize; slots.len()];
    for (new, &(_, _, old)) in first_use.iter().enumerate() {
        renumber[old] = new;
    }
    let mut sizes = vec![0u64; slots.len()];
    let mut dtypes = vec![DType::F32; slots.len()];
    for (old, slot) in slots.iter().enumerate() {
        sizes[renumber[old]] = slot.size;
        dtypes[renumber[old]] = slot.dtype;
    }
    Sharing {
        sizes,
        dtypes,
        buffer_of: slot_of.iter().map(|&s| renumber[s]).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(size: u64, first: usize, last: usize) -> Request {
        Request {
            size,
            dtype: DType::F32,
            first,
            last,
            transient: true,
        }
    }

    #[test]
    fn disjoint_lifetimes_share_and_overlapping_ones_do_not() {
        // a [0,1] and c [2,3] are disjoint; b [1,2] overlaps both.
        let rs = [req(16, 0, 1), req(8, 1, 2), req(12, 2, 3)];
        let s = share(&rs);
        assert_eq!(s.buffer_of[0], s.buffer_of[2]);
        assert_ne!(s.buffer_of[0], s.buffer_of[1]);
        assert_eq!(s.sizes.iter().sum::<u64>(), 24);
    }

    #[test]
    fn a_value_read_by_the_dispatch_that_writes_another_keeps_its_own_buffer() {
        // Read last at dispatch 3, and a value first written at 3: inclusive lifetimes overlap.
        let s = share(&[req(4, 0, 3), req(4, 3, 4)]);
        assert_ne!(s.buffer_of[0], s.buffer_of[1]);
    }

    #[test]
    fn dtypes_never_share_and_smaller_values_fill_larger_buffers() {
        let u = Request {
            dtype: DType::U32,
            ..req(4, 0, 0)
        };
        let s = share(&[req(100, 0, 0), u, req(40, 1, 1), req(60, 2, 2)]);
        assert_ne!(s.buffer_of[0], s.buffer_of[1]);
        assert_eq!(s.buffer_of[0], s.buffer_of[2]);
        assert_eq!(s.buffer_of[0], s.buffer_of[3]);
        assert_eq!(s.sizes, vec![100, 4]);
    }

    #[test]
    fn transient_f16_values_fill_dead_f32_buffers_but_not_the_other_way() {
        let f16 = |size, first, last, transient| Request {
            dtype: DType::F16,
            transient,
            ..req(size, first, last)
        };
        // A transient f16 value after a dead f32 one shares its buffer, which stays f32.
        let s = share(&[req(100, 0, 0), f16(40, 1, 1, true)]);
        assert_eq!(
            (s.buffer_of[0], s.sizes.clone()),
            (s.buffer_of[1], vec![100])
        );
        assert_eq!(s.dtypes, vec![DType::F32]);
        // An f16 output gets its own buffer.
        let s = share(&[req(100, 0, 0), f16(40, 1, 1, false)]);
        assert_ne!(s.buffer_of[0], s.buffer_of[1]);
    }

    #[test]
    fn an_f32_value_turns_a_buffer_of_transient_f16_values_into_an_f32_one() {
        let f16 = |size, first, last, transient| Request {
            dtype: DType::F16,
            transient,
            ..req(size, first, last)
        };
        // The f16 value is larger (placed first); the f32 one still reuses its buffer, now f32.
        let s = share(&[f16(100, 0, 0, true), req(100, 1, 1), f16(60, 2, 2, true)]);
        assert_eq!(s.buffer_of, vec![0, 0, 0]);
        assert_eq!((s.sizes, s.dtypes), (vec![100], vec![DType::F32]));
        // Not when the buffer holds an f16 output (the host reads it as f16).
        let s = share(&[f16(100, 0, 0, false), req(40, 1, 1)]);
        assert_ne!(s.buffer_of[0], s.buffer_of[1]);
        assert_eq!(s.dtypes, vec![DType::F16, DType::F32]);
        // Nor a u32 value: only f32 may hold f16 pairs.
        let u = Request {
            dtype: DType::U32,
            ..req(40, 1, 1)
        };
        let s = share(&[f16(100, 0, 0, true), u]);
        assert_ne!(s.buffer_of[0], s.buffer_of[1]);
    }
}
