//! The frame every kernel shares, whatever its body: the storage bindings ([`Binder`]; a value over
//! the binding limit is split across segment bindings reached through `NAME_ld` / `NAME_st`
//! accessors, [`Access`]), the constants and the prelude (`shaders/prelude.wgsl`), the grid folded
//! into x/y/z ([`fold`]) and the one-invocation-per-item entry point. It is its own module so the
//! kernel generators (`kernels`, `blocked`, `grad`, `lstm`) depend on it and never on each other's
//! internals or on the parent `emit`.

use super::expr::Rope;
use crate::fuse::{base, Group};
use crate::ir::{DType, Graph, NodeId, Op};
use crate::target::{segments, Target};
use std::fmt::Write;

const PRELUDE: &str = include_str!("../../../shaders/prelude.wgsl");
const PER_ITEM_MAIN: &str = include_str!("../../../shaders/per_item_main.wgsl");

/// Invocations per workgroup of one-invocation-per-element kernels.
const WG: u32 = 256;

/// What a kernel generator hands back: the shader, the values it binds (by owning node, in slot
/// order, with write flags; a value over the binding limit takes [`segments`] consecutive bindings)
/// and its folded grid. `unsplit` names a value over the limit that the kernel indexes directly
/// (a fixed-function template), which therefore cannot run on this target.
pub(crate) struct KernelSrc {
    pub wgsl: String,
    pub bindings: Vec<(NodeId, bool)>,
    pub workgroups: [u32; 3],
    pub unsplit: Option<NodeId>,
}

/// Why a kernel could not be generated; named by the caller.
pub(crate) enum KernelError {
    /// A grid that does not fit the target even folded.
    Grid { workgroups: u64, limit: u32 },
    /// An op with no kernel yet (its mnemonic).
    Unsupported(String),
}

/// Folds a linear count of workgroups into `[x, y, z]`, each at most the target's limit. Kernels
/// recompute the linear index as `x + y·GX + z·GX·GY` and bounds-check it.
pub(crate) fn fold(total: u64, target: &Target) -> Result<[u32; 3], KernelError> {
    let max = u64::from(target.max_workgroups_per_dim.max(1));
    let total = total.max(1);
    let x = total.min(max);
    let rest = total.div_ceil(x);
    let y = rest.min(max);
    let z = rest.div_ceil(y);
    if z > max {
        return Err(KernelError::Grid {
            workgroups: total,
            limit: target.max_workgroups_per_dim,
        });
    }
    Ok([x as u32, y as u32, z as u32])
}

/// Storage bindings of one kernel, in slot order; reads are deduplicated by owning buffer. A value
/// larger than the target's binding limit takes several bindings ([`segments`]), which the
/// kernel reaches through the accessor functions [`Access`] names.
pub(crate) struct Binder<'g> {
    graph: &'g Graph,
    target: &'g Target,
    slots: Vec<Slot>,
}

/// One binding: the value it holds, whether the kernel writes it, its WGSL name, and whether it is a
/// read-only `array<vec4<f32>>` view ([`Binder::vec4_view`]) rather than the value's own element type.
struct Slot {
    node: NodeId,
    writes: bool,
    name: String,
    vec4: bool,
}

impl<'g> Binder<'g> {
    pub(crate) fn new(graph: &'g Graph, target: &'g Target) -> Self {
        Binder {
            graph,
            target,
            slots: Vec::new(),
        }
    }

    /// Name of the read-only binding holding `operand` (its Reshape base's buffer).
    pub(crate) fn read(&mut self, operand: NodeId) -> String {
        let b = base(self.graph, operand);
        self.slot(b, false, false)
    }

    pub(crate) fn read_as(&mut self, operand: NodeId, name: &str) {
        let b = base(self.graph, operand);
        self.push(b, false, name.to_string(), false);
    }

    pub(crate) fn write(&mut self, node: NodeId) -> String {
        self.slot(node, true, false)
    }

    pub(crate) fn write_as(&mut self, node: NodeId, name: &str) {
        self.push(node, true, name.to_string(), false);
    }

    /// A read-only `array<vec4<f32>>` view of the binding `name` (an unsplit f32 value), bound again
    /// beside it: llvmpipe pays per load, not per byte, so a matmul whose operands are contiguous in
    /// whole vec4s loads four elements at once (docs/DECISIONS.md, Runtime: vec4 loads).
    pub(crate) fn vec4_view(&mut self, name: &str) -> String {
        let node = self
            .slots
            .iter()
            .find(|slot| slot.name == name)
            .map(|slot| slot.node)
            .unwrap_or_else(|| unreachable!("{name} is not bound"));
        self.slot(node, false, true)
    }

    /// Bindings so far, as the adapter counts them: a split value takes one per segment.
    pub(crate) fn binding_count(&self) -> usize {
        self.slots
            .iter()
            .map(|slot| self.segments(slot.node).len())
            .sum()
    }

    /// The name of the binding of `node` with these flags, bound now if it is not yet.
    fn slot(&mut self, node: NodeId, writes: bool, vec4: bool) -> String {
        let found = self
            .slots
            .iter()
            .find(|slot| slot.node == node && slot.writes == writes && slot.vec4 == vec4);
        if let Some(slot) = found {
            return slot.name.clone();
        }
        let name = format!("b{}", self.slots.len());
        self.push(node, writes, name.clone(), vec4);
        name
    }

    fn push(&mut self, node: NodeId, writes: bool, name: String, vec4: bool) {
        self.slots.push(Slot {
            node,
            writes,
            name,
            vec4,
        });
    }

    /// How many bindings the value of `node` takes on this target.
    fn segments(&self, node: NodeId) -> Vec<(u64, u64)> {
        segments(
            self.graph.ty(node).buffer_bytes(),
            self.target.max_storage_binding_size,
        )
    }

    /// How the binding `name` is read and written (see [`Access`]).
    pub(crate) fn access(&self, name: &str) -> Access {
        let slot = self.slots.iter().find(|slot| slot.name == name);
        let dtype = slot.map_or(DType::F32, |slot| self.graph.ty(slot.node).dtype);
        Access {
            name: name.to_string(),
            f16: dtype == DType::F16,
            split: slot.is_some_and(|slot| self.segments(slot.node).len() > 1),
        }
    }

    /// The read binding of `operand` as a matmul operand load.
    pub(crate) fn load(&mut self, operand: NodeId) -> Load {
        let name = self.read(operand);
        Load::Buffer(self.access(&name))
    }

    /// `name[idx]` as a value for f32 arithmetic (an f16 binding is widened).
    pub(crate) fn at(&self, name: &str, idx: &str) -> String {
        self.access(name).at(idx)
    }

    /// The statement storing the f32 expression `value` at `name[idx]` (rounded for an f16 binding).
    pub(crate) fn put(&self, name: &str, idx: &str, value: &str) -> String {
        self.access(name).put(idx, value)
    }

    /// Assembles constants, bindings, prelude and body into a kernel.
    pub(crate) fn finish(
        self,
        consts: &[(&str, u64)],
        body: &str,
        workgroups: [u32; 3],
    ) -> KernelSrc {
        let mut s = String::new();
        if self
            .slots
            .iter()
            .any(|slot| self.graph.ty(slot.node).dtype == DType::F16)
        {
            s.push_str("enable f16;\n");
        }
        for (name, value) in consts {
            let _ = writeln!(s, "const {name}: u32 = {value}u;");
        }
        let _ = writeln!(
            s,
            "const GX: u32 = {}u;\nconst GY: u32 = {}u;",
            workgroups[0], workgroups[1]
        );
        let mut binding = 0;
        let mut first_binding = None;
        let mut accessors = String::new();
        let mut unsplit = None;
        for Slot {
            node,
            writes,
            name,
            vec4,
        } in &self.slots
        {
            let access = if *writes { "read_write" } else { "read" };
            let ty = match vec4 {
                true => "vec4<f32>",
                false => self.graph.ty(*node).dtype.wgsl(),
            };
            let segments = self.segments(*node);
            first_binding.get_or_insert_with(|| match segments.len() {
                1 => name.clone(),
                _ => format!("{name}_0"),
            });
            if segments.len() == 1 {
                let _ = writeln!(
                    s,
                    "@group(0) @binding({binding}) var<storage, {access}> {name}: array<{ty}>;"
                );
                binding += 1;
                continue;
            }
            for j in 0..segments.len() {
                let _ = writeln!(
                    s,
                    "@group(0) @binding({binding}) var<storage, {access}> {name}_{j}: array<{ty}>;"
                );
                binding += 1;
            }
            let per = segments[0].1 / self.graph.ty(*node).dtype.size_bytes() as u64;
            accessors.push_str(&segment_accessors(name, ty, *writes, segments.len(), per));
            if indexes_directly(body, name) {
                unsplit = Some(*node);
            }
        }
        s.push_str(PRELUDE);
        s.push('\n');
        s.push_str(&accessors);
        if let Some(first) = first_binding {
            s.push_str(&opaque_trips_fn(&first, body));
        }
        s.push_str(body);
        KernelSrc {
            wgsl: s,
            bindings: self
                .slots
                .into_iter()
                .map(|slot| (slot.node, slot.writes))
                .collect(),
            workgroups,
            unsplit,
        }
    }
}

/// `NAME_ld(i)` and (for a written value) `NAME_st(i, v)` over the `count` segment bindings
/// `NAME_0..` of `per` elements each: element `i` lives in segment `i / per`.
fn segment_accessors(name: &str, ty: &str, writes: bool, count: usize, per: u64) -> String {
    let mut load = format!("fn {name}_ld(i: u32) -> {ty} {{\n");
    let mut store = format!("fn {name}_st(i: u32, v: {ty}) {{\n");
    for j in 0..count as u64 {
        let (lo, hi) = (j * per, (j + 1) * per);
        if j + 1 < count as u64 {
            let _ = writeln!(
                load,
                "    if (i < {hi}u) {{\n        return {name}_{j}[i - {lo}u];\n    }}"
            );
            let _ = writeln!(store, "    if (i < {hi}u) {{\n        {name}_{j}[i - {lo}u] = v;\n        return;\n    }}");
        } else {
            let _ = writeln!(load, "    return {name}_{j}[i - {lo}u];\n}}\n");
            let _ = writeln!(store, "    {name}_{j}[i - {lo}u] = v;\n}}\n");
        }
    }
    if writes {
        load.push_str(&store);
    }
    load
}

/// Whether `body` indexes the array `name` itself (`name[`), which a split value cannot serve.
fn indexes_directly(body: &str, name: &str) -> bool {
    let pattern = format!("{name}[");
    body.match_indices(&pattern).any(|(at, _)| {
        !body[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// A float binding as kernels use it: every computation is f32 (the accumulators of matmuls and
/// reductions included), so an f16 binding (`precision = f16`) is widened on load and rounded to
/// nearest on store, and an f32 binding is used as is. A binding split across segments is reached
/// through its `NAME_ld` / `NAME_st` accessors.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    pub name: String,
    pub f16: bool,
    pub split: bool,
}

impl Access {
    /// `name[idx]` as an f32 expression.
    pub(crate) fn at(&self, idx: &str) -> String {
        let raw = if self.split {
            format!("{}_ld({idx})", self.name)
        } else {
            format!("{}[{idx}]", self.name)
        };
        if self.f16 {
            format!("f32({raw})")
        } else {
            raw
        }
    }

    /// `name[idx] = value;` for an f32 expression `value`.
    pub(crate) fn put(&self, idx: &str, value: &str) -> String {
        let value = if self.f16 {
            format!("f16({value})")
        } else {
            value.to_string()
        };
        if self.split {
            format!("{}_st({idx}, {value});", self.name)
        } else {
            format!("{}[{idx}] = {value};", self.name)
        }
    }
}

/// How a kernel reads element `i` of a matmul operand as f32: from a buffer (widened when it is
/// f16), rotated from its operand (a RoPE prologue), or from batch `bi`'s binding of a [`Stacked`]
/// operand.
pub(crate) enum Load {
    Buffer(Access),
    Rope(RopeLoad),
    Stacked(Stacked),
}

/// A RoPE prologue: `name(i)` rotates element `i` of `x`, the operand of `rope`.
pub(crate) struct RopeLoad {
    pub name: String,
    pub rope: Rope,
    pub x: Access,
}

impl Load {
    /// The f32 WGSL expression of the element at index expression `i`.
    pub(crate) fn at(&self, i: &str) -> String {
        match self {
            Load::Buffer(access) => access.at(i),
            Load::Rope(rope) => format!("{}({i})", rope.name),
            Load::Stacked(stacked) => format!("{}(bi, {i})", stacked.name),
        }
    }
}

/// An operand whose batch `p` is its own binding `parts[p]` (the weights of horizontal products),
/// read by `name(bi, i)` with `i` indexing the stacked `[parts, stride]` operand. `bi` is uniform
/// over a workgroup in both matmul schedules, so the function's branch on it is uniform and llvmpipe
/// runs one arm; a branch on the lane-varying `i` ran every arm's load.
pub(crate) struct Stacked {
    pub name: String,
    pub parts: Vec<Access>,
    pub stride: usize,
}

impl Stacked {
    /// `fn name(bi: u32, i: u32) -> T`: element `i` of the stacked operand read from `views[bi]`,
    /// whose elements are `per` stacked elements each (4 for vec4 views).
    pub(crate) fn function(&self, name: &str, ty: &str, views: &[Access], per: usize) -> String {
        let mut f = format!("fn {name}(bi: u32, i: u32) -> {ty} {{\n");
        let last = views.len() - 1;
        for (p, view) in views.iter().enumerate() {
            let at = view.at(&format!("i - {}u", p * self.stride / per));
            if p < last {
                f += &format!("    if (bi == {p}u) {{\n        return {at};\n    }}\n");
            } else {
                f += &format!("    return {at};\n}}\n\n");
            }
        }
        f
    }
}

/// Loops of at most this many constant iterations are fully unrolled by Mesa's NIR (llvmpipe's
/// `max_unroll_iterations`).
const UNROLLED_TRIPS: usize = 32;
/// Fewer iterations unroll in next to no time (and save the loop's own overhead).
const OPAQUE_FROM: usize = 4;

/// The bound `bound` of a loop that runs `iterations` times over storage-buffer accesses. A loop of
/// at most 32 constant iterations is unrolled by llvmpipe, and an unrolled body of storage accesses
/// (each a scalar loop over the SIMD lanes with its bounds check) compiles superlinearly in the
/// count: a 2048-row kernel of two such loops took 0.16 s at 4 iterations, 0.85 s at 16 and 2.6 s
/// at 32, and 0.06 s as a loop (docs/DECISIONS.md, Runtime: cold start). Such bounds become
/// `opaque_trips(bound)`, which [`opaque_trips_fn`] defines from a binding's runtime length, so the
/// compiler cannot fold it. Longer loops are never unrolled and keep their constant, so large
/// models' generated loops are unchanged.
pub(crate) fn loop_bound(bound: usize, iterations: usize) -> String {
    if (OPAQUE_FROM..=UNROLLED_TRIPS).contains(&iterations) {
        format!("opaque_trips({bound}u)")
    } else {
        format!("{bound}u")
    }
}

/// The definition of `opaque_trips` over the storage array `binding` (declared by the kernel), when
/// `body` uses it: `n` whenever the binding is non-empty, which every binding is (wgpu binds at least
/// 4 bytes), but only known at dispatch. Templates whose loop lengths follow the model (the routing
/// table, cross-entropy, embedding gradient) call it directly whatever the length: past 32
/// iterations it costs one `select` per loop entry.
pub(crate) fn opaque_trips_fn(binding: &str, body: &str) -> String {
    if !body.contains("opaque_trips(") {
        return String::new();
    }
    format!("fn opaque_trips(n: u32) -> u32 {{\n    return select(0u, n, arrayLength(&{binding}) != 0u);\n}}\n\n")
}

/// Invocations per workgroup of one-invocation-per-element kernels on `target`.
pub(crate) fn wg_size(target: &Target) -> u32 {
    WG.min(target.max_invocations_per_workgroup.max(1))
}

/// Entry point of a kernel with one invocation per linear item `i < total`.
pub(crate) fn per_item_main(wg: u32, total: usize) -> String {
    fill(PER_ITEM_MAIN, &[("wg", &wg), ("total", &total)])
}

/// The node a group is named after and, for a Matmul group, its matmul: the first member that is not
/// an absorbed permute prologue.
pub(crate) fn anchor(graph: &Graph, group: &Group) -> NodeId {
    group
        .nodes
        .iter()
        .copied()
        .find(|&n| !is_prologue(graph, n))
        .unwrap_or(group.nodes[0])
}

/// Is group member `n` an absorbed `Permute` (read in place by its consumers, no code of its own) or
/// a RoPE or gather prologue (computed by the matmul's operand loads)? Only fusion puts these ops
/// into a multi-node group; a lone one is a `Single` group.
pub(crate) fn is_prologue(graph: &Graph, n: NodeId) -> bool {
    matches!(
        graph.node(n).op,
        Op::Permute { .. }
            | Op::Rope { .. }
            | Op::RopeGrad { .. }
            | Op::MoeGather { .. }
            | Op::MoeCombineGradRows { .. }
    )
}

/// Parses and validates WGSL with naga, as wgpu will when it creates the pipeline.
pub fn validate_wgsl(wgsl: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(wgsl).map_err(|e| e.emit_to_string(wgsl))?;
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::SUBGROUP | naga::valid::Capabilities::SHADER_FLOAT16,
    )
    .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
    .subgroup_operations(
        naga::valid::SubgroupOperationSet::BASIC | naga::valid::SubgroupOperationSet::BALLOT,
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string(wgsl))?;
    Ok(())
}

/// `template` (a kernel body from `shaders/`) with every `{key}` replaced by its value in `values`.
/// WGSL's own braces never enclose a bare identifier, so they pass through. A placeholder with no
/// value is a generator bug (every template is exercised by the kernel tests), hence the panic.
pub(crate) fn fill(template: &str, values: &[(&str, &dyn std::fmt::Display)]) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let key = rest[1..].find('}').map(|end| &rest[1..=end]).filter(|k| {
            k.starts_with(|c: char| c.is_ascii_lowercase())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        match key {
            Some(key) => {
                let (_, value) = values
                    .iter()
                    .find(|(k, _)| *k == key)
                    .unwrap_or_else(|| panic!("no value for template placeholder `{{{key}}}`"));
                let _ = write!(out, "{value}");
                rest = &rest[key.len() + 2..];
            }
            None => {
                out.push('{');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::fill;

    #[test]
    fn fill_replaces_placeholders_and_keeps_wgsl_braces() {
        let t = "fn {name}(i: u32) -> f32 {\n    return x[i % {n}u];\n}\n";
        let got = fill(t, &[("name", &"f"), ("n", &4usize)]);
        assert_eq!(got, "fn f(i: u32) -> f32 {\n    return x[i % 4u];\n}\n");
    }
}
