//! A shape-level replay of candle's tensor lifetimes: which tensors an op allocates, which
//! ones stay alive because a recorded op holds them, and what the backward allocates and
//! keeps, node by node, in candle's order. Nothing is computed and nothing of the model's size
//! is allocated: a node is an element count, an element size, and the op that made it.
//!
//! The rules are those of candle-core 0.11 (`tensor.rs`, `tensor_cat.rs`, `backprop.rs`):
//!
//! - A tensor is an `Arc`: it lives while a Rust value or a recorded op holds it. An op records
//!   its inputs (and so keeps them alive) only when one of them is tracked (a variable, or the
//!   output of a recorded op); an untracked op is a leaf that holds nothing.
//! - Views (`reshape` of a contiguous tensor, `transpose`, `permute`, `narrow`, `squeeze`,
//!   `unsqueeze`, `broadcast_as`, `detach`) share their input's storage; everything else
//!   allocates its output. `reshape` of a strided tensor copies; `contiguous()` of a
//!   contiguous one, a full-range `narrow` and a one-argument `cat` return the tensor itself.
//! - The backward walks the tracked nodes in reverse topological order (a depth-first
//!   post-order from the root, inputs in argument order). A node's gradient is removed from the
//!   store when the node is processed and detached; variables keep theirs. Each contribution is
//!   `sum = grads.or_insert(arg)` (zeros of `arg`'s shape when absent) then
//!   `*sum = sum.add(contribution)`. Only the incoming gradient is detached: a contribution
//!   computed with a forward tensor (`grad · rhs`, `arg.sqr()`, `lhs.t().matmul(grad)`) is a
//!   recorded op, so the stored sum keeps that whole chain of temporaries (and the forward
//!   tensors in it) alive until the sum itself is processed, or, for variables and untracked
//!   operands, until the store is dropped.
//!
//! Rust's ownership is mirrored with scopes: every op's result is a handle owned by the
//! current scope ([`Tape::begin`]); [`Tape::end`] drops the scope's handles except those it
//! hands to the enclosing scope.

use std::collections::HashMap;

pub(crate) type Id = usize;

/// Heap bytes of a candle tensor besides its data: the `Arc<Tensor_>` with its layout (shape
/// and stride vectors; 160 + 16 × rank bytes, measured with the counting allocator; rank 4
/// taken), and of a new storage, its `Arc<RwLock<Storage>>` (about 72 bytes). They matter only
/// for tiny models, whose graphs have thousands of small tensors.
pub(crate) const TENSOR_HEADER: u64 = 224;
pub(crate) const STORAGE_HEADER: u64 = 72;

/// Element-wise unary ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Un {
    Sqr,
    Neg,
    Abs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bin {
    Add,
    Sub,
    Mul,
}

/// The fused custom ops of `sepdist_model::ops` (own CPU kernel and backward). Each records
/// only its inputs; its backward computes the inputs' gradients into new tensors (untracked:
/// the backward works on detached operands) before candle accumulates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fused {
    /// `norm::rms_norm` / `rms_norm_groups` `(x, gamma)`: the backward kernel returns `dx ‖ dγ`
    /// in one buffer; `dγ` is copied out of it.
    RmsNorm,
    /// `attn_proj::qkv_rope` `(hn, w)` → `[3, S, H, L, Dh]`: the backward unrotates the gradient
    /// into `[rows, 3·I]`, then `dw = gᵀ·hn`, `dhn = g·w`.
    QkvRope,
    /// `attention::flash_attention_packed` `(qkv)`: the backward kernel's packed
    /// `(dq, dk, dv)` is the gradient.
    FlashPacked,
    /// `attn_proj::out_proj_residual` `(fo, wo, x)`, `o` having `rows_inner` elements in rows:
    /// the backward gathers `o` again for `dwo`, then `do = g·wo` scattered into `fo`'s layout;
    /// `dx` is the incoming gradient itself.
    OutProj { rows_inner: u64 },
    /// `ffn::linear_bias` (`gelu == false`) / `gelu_linear_bias` `(x, w, b)`: `dw = gᵀ·act(x)`
    /// (GELU recomputed, a temporary), `db = Σ g`, `dx = g·w` (times `gelu'(x)` in place).
    Linear { gelu: bool },
    /// `grouped_linear::grouped_linear` `(x, w, b)` (`tanh`: with the activation): the
    /// backward computes `gz = g·(1 − y²)` into a new buffer (with tanh; else `gz` is `g`),
    /// then `dw = xᵀ·gz`, `db = Σ gz`, `dx = gz·wᵀ`; `gz` dies when it returns.
    GroupedLinear { tanh: bool },
    /// `glu::glu_tanh` `(h)`: the backward kernel returns `dh`.
    Glu,
    /// `Stft::inverse_masked` `(mask, spec)`: the backward applies the iSTFT's adjoint to the
    /// gradient (`dy`, of the mask's size; its kernel holds `adjoint_scratch` bytes meanwhile),
    /// then returns `dspec = Σ_s dy·conj(mask)` and `dmask = dy·conj(spec)` (each only when
    /// tracked; the GPU's composed products hold `product_scratch` bytes before `dmask`); `dy`
    /// dies when the backward returns.
    MaskedIstft {
        adjoint_scratch: u64,
        product_scratch: u64,
    },
    /// `stft_l1::multi_stft_l1` `(x)`: the backward kernel allocates `dx`, then holds
    /// `scratch` bytes (a resolution's frame buffer and padded overlap-add) while it fills it.
    MultiStftL1 { scratch: u64 },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    /// Data, parameters, the output of an untracked op, or a detached tensor.
    Leaf,
    Unary(Un, Id),
    Affine(Id),
    Binary(Bin, Id, Id),
    Broadcast(Id),
    /// Reduction by sum (`sum_keepdim`, `sum_all`).
    Sum(Id),
    Matmul(Id, Id),
    /// `contiguous()` of a strided tensor.
    Copy(Id),
    /// `reshape` (view or copy), `squeeze`, `unsqueeze`.
    Reshape(Id),
    /// `transpose`, `permute`, `t()`.
    Transpose(Id),
    Narrow(Id),
    Cat(Vec<Id>),
    /// A comparison (u8 result): records only its left operand.
    Cmp(Id),
    WhereCond(Id, Id, Id),
    Fused(Fused, Vec<Id>),
}

impl Op {
    fn inputs(&self) -> Vec<Id> {
        match self {
            Op::Leaf => vec![],
            Op::Unary(_, a)
            | Op::Affine(a)
            | Op::Broadcast(a)
            | Op::Sum(a)
            | Op::Copy(a)
            | Op::Reshape(a)
            | Op::Transpose(a)
            | Op::Narrow(a)
            | Op::Cmp(a) => vec![*a],
            Op::Binary(_, a, b) | Op::Matmul(a, b) => vec![*a, *b],
            Op::Cat(v) | Op::Fused(_, v) => v.clone(),
            Op::WhereCond(a, b, c) => vec![*a, *b, *c],
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub elems: u64,
    /// Bytes per element.
    pub es: u64,
    /// Index into the tape's storages (shared by views).
    pub storage: usize,
    /// `Op::Leaf` when the op was not recorded.
    pub op: Op,
    pub tracked: bool,
    pub var: bool,
    /// Whether the layout is contiguous (decides if `contiguous()`/`reshape` copy).
    pub contiguous: bool,
    /// Holders: Rust values and recorded ops.
    rc: u32,
    /// Heap bytes of the tensor's header.
    header: u64,
}

/// Live heap bytes and their high-water mark, with a label for where the peak was reached.
#[derive(Debug, Clone, Default)]
pub(crate) struct Mem {
    pub live: u64,
    pub peak: u64,
    pub peak_at: String,
    /// Label of what is running now (for `peak_at`).
    pub at: String,
    /// Communication buffers among `live`, and their amount when the peak was reached.
    pub comm: u64,
    pub comm_at_peak: u64,
}

impl Mem {
    pub fn alloc(&mut self, bytes: u64) -> u64 {
        self.live += bytes;
        if self.live > self.peak {
            self.peak = self.live;
            self.peak_at.clone_from(&self.at);
            self.comm_at_peak = self.comm;
        }
        bytes
    }
    /// A communication buffer (counted in `live` and in `comm`).
    pub fn alloc_comm(&mut self, bytes: u64) -> u64 {
        self.comm += bytes;
        self.alloc(bytes)
    }
    pub fn free(&mut self, bytes: u64) {
        debug_assert!(self.live >= bytes, "freeing {bytes} of {}", self.live);
        self.live = self.live.saturating_sub(bytes);
    }
    /// A buffer allocated and freed at once (a kernel's scratch).
    pub fn spike(&mut self, bytes: u64) {
        self.alloc(bytes);
        self.free(bytes);
    }
}

/// Tensors of one micro-batch and the memory they occupy.
#[derive(Debug)]
pub(crate) struct Tape {
    pub nodes: Vec<Node>,
    /// Per storage: bytes and the number of live nodes using it.
    storages: Vec<(u64, u32)>,
    /// Handles owned by each open scope (innermost last).
    scopes: Vec<Vec<Id>>,
    pub mem: Mem,
}

/// Gradients in a store: forward node → its gradient's node (a handle the store owns).
pub(crate) type Store = HashMap<Id, Id>;

impl Tape {
    pub fn new() -> Self {
        Self {
            nodes: Vec::new(),
            storages: Vec::new(),
            scopes: vec![Vec::new()],
            mem: Mem::default(),
        }
    }

    pub fn elems(&self, id: Id) -> u64 {
        self.nodes[id].elems
    }

    // ----- ownership -----

    /// Opens a scope: handles created until [`Tape::end`] belong to it.
    pub fn begin(&mut self) {
        self.scopes.push(Vec::new());
    }

    /// Closes the innermost scope: `keep` (one handle each, results of the scope) move to the
    /// enclosing scope; every other handle is dropped.
    pub fn end(&mut self, keep: &[Id]) {
        let mut handles = self.scopes.pop().unwrap_or_default();
        for &k in keep {
            if let Some(pos) = handles.iter().rposition(|&h| h == k) {
                handles.swap_remove(pos);
                self.push_handle(k);
            } else {
                // Kept without a handle of this scope: the enclosing scope gets a new one.
                self.retain(k);
            }
        }
        for h in handles {
            self.release(h);
        }
    }

    fn push_handle(&mut self, id: Id) {
        if let Some(s) = self.scopes.last_mut() {
            s.push(id);
        }
    }

    /// A new handle to `id` in the current scope (a `clone()`).
    pub fn retain(&mut self, id: Id) -> Id {
        self.nodes[id].rc += 1;
        self.push_handle(id);
        id
    }

    /// Moves one handle of `id` out of the current scope into the caller's custody (a store
    /// entry, a struct field); give it back with [`Tape::release`] when that holder drops it.
    pub fn take(&mut self, id: Id) -> Id {
        if let Some(s) = self.scopes.last_mut() {
            if let Some(pos) = s.iter().rposition(|&h| h == id) {
                s.swap_remove(pos);
                return id;
            }
        }
        // Not owned by the scope: take a new handle.
        self.nodes[id].rc += 1;
        id
    }

    /// Drops one handle of `id` (held in custody, see [`Tape::take`]).
    pub fn release(&mut self, id: Id) {
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            let n = &mut self.nodes[id];
            debug_assert!(n.rc > 0, "node {id} released too often");
            n.rc = n.rc.saturating_sub(1);
            if n.rc > 0 {
                continue;
            }
            let s = n.storage;
            let inputs = n.op.inputs();
            let header = n.header;
            self.mem.free(header);
            let st = &mut self.storages[s];
            st.1 = st.1.saturating_sub(1);
            if st.1 == 0 {
                let b = st.0;
                self.mem.free(b);
            }
            stack.extend(inputs);
        }
    }

    /// Drops the handle of `id` owned by the current scope (a Rust value dropped early:
    /// reassigned, moved into a call, end of statement).
    pub fn drop_local(&mut self, id: Id) {
        let id = self.take(id);
        self.release(id);
    }

    // ----- construction -----

    fn push(&mut self, elems: u64, es: u64, op: Op, var: bool, storage: Option<usize>) -> Id {
        let inputs = op.inputs();
        let tracked = var || inputs.iter().any(|&i| self.nodes[i].tracked);
        let storage = match storage {
            Some(s) => {
                self.storages[s].1 += 1;
                s
            }
            None => {
                let bytes = elems * es + STORAGE_HEADER;
                self.mem.alloc(bytes);
                self.storages.push((bytes, 1));
                self.storages.len() - 1
            }
        };
        let header = if var && self.storages[storage].0 == 0 {
            0 // a parameter's own tensor, cloned
        } else {
            TENSOR_HEADER
        };
        self.mem.alloc(header);
        let op = if tracked {
            for &i in &inputs {
                self.nodes[i].rc += 1;
            }
            op
        } else {
            Op::Leaf
        };
        self.nodes.push(Node {
            elems,
            es,
            storage,
            op,
            tracked,
            var,
            contiguous: true,
            rc: 1,
            header,
        });
        let id = self.nodes.len() - 1;
        self.push_handle(id);
        id
    }

    /// A tensor allocated here (data, a copy made into a `Var`, zeros, ones...).
    pub fn leaf(&mut self, elems: u64, es: u64, var: bool) -> Id {
        self.push(elems, es, Op::Leaf, var, None)
    }

    /// A tensor whose data is accounted elsewhere (parameters: tracked ones are the
    /// variables' own tensors, untracked ones their detached copies).
    pub fn external(&mut self, elems: u64, es: u64, var: bool) -> Id {
        self.storages.push((0, 0));
        let s = self.storages.len() - 1;
        self.push(elems, es, Op::Leaf, var, Some(s))
    }

    /// `zeros_like` / `ones_like`.
    pub fn like(&mut self, a: Id) -> Id {
        let (e, es) = (self.nodes[a].elems, self.nodes[a].es);
        self.leaf(e, es, false)
    }

    fn alloc_op(&mut self, elems: u64, op: Op, es: u64) -> Id {
        self.push(elems, es, op, false, None)
    }

    fn view_op(&mut self, of: Id, elems: u64, op: Op, contiguous: bool) -> Id {
        let (es, storage) = (self.nodes[of].es, self.nodes[of].storage);
        let id = self.push(elems, es, op, false, Some(storage));
        self.nodes[id].contiguous = contiguous;
        id
    }

    /// `detach()`: the same storage, no op.
    pub fn detach(&mut self, a: Id) -> Id {
        let (e, c) = (self.nodes[a].elems, self.nodes[a].contiguous);
        self.view_op(a, e, Op::Leaf, c)
    }

    pub fn unary(&mut self, u: Un, a: Id) -> Id {
        let (e, es) = (self.nodes[a].elems, self.nodes[a].es);
        self.alloc_op(e, Op::Unary(u, a), es)
    }

    /// `x * c`, `x + c`, `x / c`, `c * x`: candle's `affine`.
    pub fn affine(&mut self, a: Id) -> Id {
        let (e, es) = (self.nodes[a].elems, self.nodes[a].es);
        self.alloc_op(e, Op::Affine(a), es)
    }

    /// `broadcast_as`: a view with its own node.
    pub fn broadcast(&mut self, a: Id, elems: u64) -> Id {
        self.view_op(a, elems, Op::Broadcast(a), false)
    }

    /// `a op b` of equal shapes.
    pub fn binary(&mut self, b: Bin, x: Id, y: Id) -> Id {
        let (e, es) = (
            self.nodes[x].elems.max(self.nodes[y].elems),
            self.nodes[x].es,
        );
        self.alloc_op(e, Op::Binary(b, x, y), es)
    }

    /// `broadcast_add/sub/mul`: operands whose shape differs from the result's get a
    /// `Broadcast` node first (candle's `broadcast_binary_op!`); those views die with the
    /// statement unless the op records them.
    pub fn bbinary(&mut self, b: Bin, x: Id, y: Id, out: u64) -> Id {
        let xb = if self.nodes[x].elems != out {
            self.broadcast(x, out)
        } else {
            x
        };
        let yb = if self.nodes[y].elems != out {
            self.broadcast(y, out)
        } else {
            y
        };
        let r = self.binary(b, xb, yb);
        if xb != x {
            self.drop_local(xb);
        }
        if yb != y {
            self.drop_local(yb);
        }
        r
    }

    pub fn sum(&mut self, a: Id, out: u64) -> Id {
        let es = self.nodes[a].es;
        self.alloc_op(out, Op::Sum(a), es)
    }

    pub fn matmul(&mut self, a: Id, b: Id, out: u64) -> Id {
        let es = self.nodes[a].es;
        self.alloc_op(out, Op::Matmul(a, b), es)
    }

    /// `contiguous()`: the tensor itself when contiguous, a copy otherwise.
    pub fn contiguous(&mut self, a: Id) -> Id {
        if self.nodes[a].contiguous {
            self.retain(a)
        } else {
            let (e, es) = (self.nodes[a].elems, self.nodes[a].es);
            self.alloc_op(e, Op::Copy(a), es)
        }
    }

    /// `reshape`: a view of a contiguous tensor, a copy of a strided one.
    pub fn reshape(&mut self, a: Id) -> Id {
        let e = self.nodes[a].elems;
        if self.nodes[a].contiguous {
            self.view_op(a, e, Op::Reshape(a), true)
        } else {
            let es = self.nodes[a].es;
            self.alloc_op(e, Op::Reshape(a), es)
        }
    }

    /// `squeeze`/`unsqueeze`: always a view (keeps the strides).
    pub fn squeeze(&mut self, a: Id) -> Id {
        let (e, c) = (self.nodes[a].elems, self.nodes[a].contiguous);
        self.view_op(a, e, Op::Reshape(a), c)
    }

    /// `transpose`/`permute`/`t()`; `contiguous` says whether the result happens to be
    /// contiguous (only size-1 dimensions moved).
    pub fn transpose(&mut self, a: Id, contiguous: bool) -> Id {
        let e = self.nodes[a].elems;
        self.view_op(a, e, Op::Transpose(a), contiguous)
    }

    /// `narrow` to `elems` elements; a full-range narrow is the tensor itself.
    pub fn narrow(&mut self, a: Id, elems: u64, contiguous: bool) -> Id {
        if elems == self.nodes[a].elems {
            return self.retain(a);
        }
        self.view_op(a, elems, Op::Narrow(a), contiguous)
    }

    /// `Tensor::cat`: one argument is returned as is; more are copied into a new tensor.
    pub fn cat(&mut self, parts: &[Id]) -> Id {
        if parts.len() == 1 {
            return self.retain(parts[0]);
        }
        let e = parts.iter().map(|&p| self.nodes[p].elems).sum();
        let es = self.nodes[parts[0]].es;
        self.alloc_op(e, Op::Cat(parts.to_vec()), es)
    }

    /// A comparison with a u8 result (`ge`, ...).
    pub fn cmp(&mut self, a: Id) -> Id {
        let e = self.nodes[a].elems;
        self.alloc_op(e, Op::Cmp(a), 1)
    }

    pub fn where_cond(&mut self, pred: Id, t: Id, f: Id) -> Id {
        let (e, es) = (self.nodes[t].elems, self.nodes[t].es);
        self.alloc_op(e, Op::WhereCond(pred, t, f), es)
    }

    /// A fused op on `inputs` with an output of `out` elements; its CPU kernel holds
    /// `scratch` bytes while it allocates the output (e.g. the matmul result it permutes).
    pub fn fused(&mut self, op: Fused, inputs: &[Id], out: u64, scratch: u64) -> Id {
        let es = self.nodes[inputs[0]].es;
        self.mem.alloc(scratch);
        let id = self.alloc_op(out, Op::Fused(op, inputs.to_vec()), es);
        self.mem.free(scratch);
        id
    }

    // ----- backward -----

    /// candle's `Tensor::sorted_nodes`: tracked nodes reachable from `root`, root first.
    fn sorted(&self, root: Id) -> Vec<Id> {
        let mut seen: HashMap<Id, bool> = HashMap::new();
        let mut out = Vec::new();
        // Iterative post-order: (node, next input index, tracks-a-variable so far).
        let mut stack: Vec<(Id, usize, bool)> = vec![(root, 0, false)];
        while let Some(&mut (id, ref mut next, ref mut tg)) = stack.last_mut() {
            let n = &self.nodes[id];
            if *next == 0 && n.var {
                *tg = true;
            }
            let inputs = if n.var { Vec::new() } else { n.op.inputs() };
            if *next < inputs.len() {
                let child = inputs[*next];
                *next += 1;
                match seen.get(&child) {
                    Some(&ctg) => *tg |= ctg,
                    None => stack.push((child, 0, false)),
                }
                continue;
            }
            let done_tg = *tg;
            stack.pop();
            seen.insert(id, done_tg);
            if done_tg {
                out.push(id);
            }
            if let Some(parent) = stack.last_mut() {
                parent.2 |= done_tg;
            }
        }
        out.reverse();
        out
    }

    fn or_insert(&mut self, store: &mut Store, a: Id) {
        if let std::collections::hash_map::Entry::Vacant(slot) = store.entry(a) {
            let z = self.like(a);
            slot.insert(self.take(z));
        }
    }

    /// `*sum = sum.add(x)` (or `.sub`): the new sum replaces the old one in the store.
    fn add_into(&mut self, store: &mut Store, a: Id, x: Id) {
        let old = store[&a];
        let new = self.binary(Bin::Add, old, x);
        let new = self.take(new);
        store.insert(a, new);
        self.release(old);
    }

    fn accumulate(&mut self, store: &mut Store, a: Id, x: Id) {
        self.or_insert(store, a);
        self.add_into(store, a, x);
    }

    /// `root.backward()`: the gradients left in the store (variables', and those of untracked
    /// operands) are returned in the caller's custody.
    pub fn backward(&mut self, root: Id) -> Store {
        let order = self.sorted(root);
        let mut store = Store::new();
        // grads.insert(self, self.ones_like()?.contiguous()?)
        let ones = self.like(root);
        let ones = self.take(ones);
        store.insert(root, ones);
        for id in order {
            if self.nodes[id].var {
                continue;
            }
            let Some(original) = store.remove(&id) else {
                continue;
            };
            self.begin();
            // `let grad = grad.detach()` shadows the original, which (with the chain of
            // temporaries it holds) lives to the end of the loop body.
            let grad = self.detach(original);
            let op = self.nodes[id].op.clone();
            self.rule(&mut store, id, grad, op);
            self.end(&[]);
            self.release(original);
        }
        store
    }

    /// One arm of candle's backward `match`; temporaries are handles of the arm's scope.
    fn rule(&mut self, store: &mut Store, node: Id, grad: Id, op: Op) {
        match op {
            Op::Leaf | Op::Cmp(_) | Op::WhereCond(..) => {}
            Op::Binary(Bin::Add | Bin::Sub, l, r) => {
                self.accumulate(store, l, grad);
                self.accumulate(store, r, grad);
            }
            Op::Binary(Bin::Mul, l, r) => {
                let lg = self.binary(Bin::Mul, grad, r);
                self.accumulate(store, l, lg);
                let rg = self.binary(Bin::Mul, grad, l);
                self.accumulate(store, r, rg);
            }
            Op::Matmul(l, r) => {
                let rt = self.transpose(r, false);
                let lg = self.matmul(grad, rt, self.elems(l));
                self.drop_local(rt);
                self.accumulate(store, l, lg);
                let lt = self.transpose(l, false);
                let rg = self.matmul(lt, grad, self.elems(r));
                self.drop_local(lt);
                self.accumulate(store, r, rg);
            }
            Op::Cat(args) => {
                for a in args {
                    let part = self.narrow(grad, self.elems(a), false);
                    self.accumulate(store, a, part);
                }
            }
            Op::Broadcast(a) => {
                let s = self.sum(grad, self.elems(a));
                let sq = self.squeeze(s);
                let b = self.broadcast(sq, self.elems(a));
                self.accumulate(store, a, b);
                self.drop_local(b);
            }
            Op::Sum(a) => {
                let b = self.broadcast(grad, self.elems(a));
                self.accumulate(store, a, b);
            }
            Op::Copy(a) | Op::Reshape(a) | Op::Transpose(a) => {
                let v = self.squeeze(grad);
                self.accumulate(store, a, v);
            }
            Op::Narrow(a) => {
                let pad = self.elems(a) - self.elems(node);
                let es = self.nodes[a].es;
                let z = self.leaf(pad, es, false);
                let c = self.cat(&[z, grad]);
                self.accumulate(store, a, c);
            }
            Op::Affine(a) => {
                let g = self.affine(grad);
                self.accumulate(store, a, g);
            }
            Op::Unary(u, a) => self.unary_rule(store, grad, u, a),
            Op::Fused(f, args) => self.fused_rule(store, node, grad, f, &args),
        }
    }

    /// The backward of a fused op: its `bwd` returns a gradient per tracked input (its
    /// temporaries die when it returns), then candle accumulates them in argument order, each
    /// returned tensor dropped after its accumulation.
    fn fused_rule(&mut self, store: &mut Store, node: Id, grad: Id, f: Fused, args: &[Id]) {
        let tracked = |t: &Self, i: usize| t.nodes[args[i]].tracked;
        let es = self.nodes[node].es;
        let mut grads: Vec<Option<Id>> = vec![None; args.len()];
        match f {
            Fused::RmsNorm => {
                let (x, g) = (args[0], args[1]);
                let packed = self.leaf(self.elems(x) + self.elems(g), es, false);
                if tracked(self, 0) {
                    let v = self.narrow(packed, self.elems(x), true);
                    grads[0] = Some(self.reshape(v));
                    self.drop_local(v);
                }
                if tracked(self, 1) {
                    // dγ copied out of the packed buffer.
                    grads[1] = Some(self.leaf(self.elems(g), es, false));
                }
                self.drop_local(packed);
            }
            Fused::QkvRope => {
                let (hn, w) = (args[0], args[1]);
                let gq = self.leaf(self.elems(node), es, false);
                if tracked(self, 1) {
                    grads[1] = Some(self.leaf(self.elems(w), es, false));
                }
                if tracked(self, 0) {
                    grads[0] = Some(self.leaf(self.elems(hn), es, false));
                }
                self.drop_local(gq);
            }
            Fused::FlashPacked => {
                if tracked(self, 0) {
                    grads[0] = Some(self.leaf(self.elems(args[0]), es, false));
                }
            }
            Fused::OutProj { rows_inner } => {
                let (fo, wo) = (args[0], args[1]);
                if tracked(self, 1) {
                    let o = self.leaf(rows_inner, es, false);
                    grads[1] = Some(self.leaf(self.elems(wo), es, false));
                    self.drop_local(o);
                }
                if tracked(self, 0) {
                    let d_o = self.leaf(rows_inner, es, false);
                    grads[0] = Some(self.leaf(self.elems(fo), es, false));
                    self.drop_local(d_o);
                }
                if tracked(self, 2) {
                    grads[2] = Some(self.retain(grad));
                }
            }
            Fused::Linear { gelu } => {
                let (x, w, b) = (args[0], args[1], args[2]);
                if tracked(self, 1) {
                    let act = gelu.then(|| self.leaf(self.elems(x), es, false));
                    grads[1] = Some(self.leaf(self.elems(w), es, false));
                    if let Some(a) = act {
                        self.drop_local(a);
                    }
                }
                if tracked(self, 2) {
                    // g.sum(0): a reduction and its squeezed view.
                    let sum = self.leaf(self.elems(b), es, false);
                    grads[2] = Some(self.squeeze(sum));
                    self.drop_local(sum);
                }
                if tracked(self, 0) {
                    // `da = g·w` (times `gelu'(x)` in place).
                    let da = self.leaf(self.elems(x), es, false);
                    grads[0] = Some(self.reshape(da));
                    self.drop_local(da);
                }
            }
            Fused::GroupedLinear { tanh } => {
                let (x, w, b) = (args[0], args[1], args[2]);
                let gz = tanh.then(|| self.leaf(self.elems(node), es, false));
                if tracked(self, 1) {
                    grads[1] = Some(self.leaf(self.elems(w), es, false));
                }
                if tracked(self, 2) {
                    // gz.sum(1): a reduction and its squeezed view.
                    let sum = self.leaf(self.elems(b), es, false);
                    grads[2] = Some(self.squeeze(sum));
                    self.drop_local(sum);
                }
                if tracked(self, 0) {
                    grads[0] = Some(self.leaf(self.elems(x), es, false));
                }
                if let Some(gz) = gz {
                    self.drop_local(gz);
                }
            }
            Fused::Glu => {
                if tracked(self, 0) {
                    grads[0] = Some(self.leaf(self.elems(args[0]), es, false));
                }
            }
            Fused::MaskedIstft {
                adjoint_scratch,
                product_scratch,
            } => {
                let (mask, spec) = (args[0], args[1]);
                self.mem.alloc(adjoint_scratch);
                let dy = self.leaf(self.elems(mask), es, false);
                self.mem.free(adjoint_scratch);
                if tracked(self, 1) {
                    grads[1] = Some(self.leaf(self.elems(spec), es, false));
                }
                if tracked(self, 0) {
                    self.mem.spike(product_scratch);
                    grads[0] = Some(self.leaf(self.elems(mask), es, false));
                }
                self.drop_local(dy);
            }
            Fused::MultiStftL1 { scratch } => {
                if tracked(self, 0) {
                    grads[0] = Some(self.leaf(self.elems(args[0]), es, false));
                    self.mem.spike(scratch);
                }
            }
        }
        for (a, g) in args.iter().zip(grads) {
            if let Some(g) = g {
                self.accumulate(store, *a, g);
                self.drop_local(g);
            }
        }
    }

    fn unary_rule(&mut self, store: &mut Store, grad: Id, u: Un, a: Id) {
        match u {
            Un::Sqr => {
                // arg.mul(&grad)?.affine(2., 0.)?
                let m = self.binary(Bin::Mul, a, grad);
                let g = self.affine(m);
                self.drop_local(m);
                self.accumulate(store, a, g);
            }
            Un::Neg => self.accumulate(store, a, grad),
            Un::Abs => {
                self.or_insert(store, a);
                let ones = self.like(a);
                // arg.ge(&arg.zeros_like()?)?.where_cond(&ones, &ones.neg()?)
                let zeros = self.like(a);
                let mask = self.cmp(a);
                let neg = self.unary(Un::Neg, ones);
                let abs_grad = self.where_cond(mask, ones, neg);
                self.drop_local(zeros);
                self.drop_local(mask);
                self.drop_local(neg);
                let p = self.binary(Bin::Mul, grad, abs_grad);
                self.add_into(store, a, p);
                self.drop_local(p);
            }
        }
    }

    /// Drops a gradient store, except `keep`'s gradient, whose handle is returned.
    pub fn drop_store(&mut self, mut store: Store, keep: Option<Id>) -> Option<Id> {
        let kept = keep.and_then(|k| store.remove(&k));
        let mut rest: Vec<Id> = store.into_values().collect();
        rest.sort_unstable();
        for g in rest {
            self.release(g);
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heap bytes of a tensor of `elems` f32 with its own storage.
    fn t32(elems: u64) -> u64 {
        elems * 4 + TENSOR_HEADER + STORAGE_HEADER
    }

    #[test]
    fn plan_tape_mul_keeps_inputs_and_leaves_the_data_gradient_in_the_store() {
        let mut t = Tape::new();
        t.begin();
        let w = t.external(10, 4, true);
        let x = t.leaf(10, 4, false);
        let y = t.binary(Bin::Mul, w, x);
        assert_eq!(t.mem.live, 2 * t32(10));
        let s = t.sum(y, 1);
        t.end(&[s]);
        assert_eq!(
            t.mem.live,
            2 * t32(10) + t32(1),
            "x, y and the sum are kept by the graph"
        );
        let store = t.backward(s);
        // The gradients of w (a variable) and of the untracked x remain.
        assert_eq!(store.len(), 2);
        t.drop_store(store, None);
        t.drop_local(s);
        assert_eq!(
            t.mem.live, 0,
            "everything is freed once the graph and store are gone"
        );
    }

    #[test]
    fn plan_tape_untracked_ops_do_not_keep_their_inputs() {
        let mut t = Tape::new();
        t.begin();
        let x = t.leaf(100, 4, false);
        let y = t.unary(Un::Neg, x);
        let z = t.unary(Un::Sqr, y);
        t.end(&[z]);
        assert_eq!(t.mem.live, t32(100));
        assert_eq!(t.mem.peak, 3 * t32(100));
    }

    #[test]
    fn plan_tape_a_fused_op_keeps_its_inputs_and_leaves_plain_gradients() {
        // y = rms_norm(x, γ), loss = Σy: the graph keeps x and y; the backward kernel's packed
        // (dx, dγ) is a temporary, and the store ends with two plain sums (no chains).
        let mut t = Tape::new();
        t.begin();
        let x = t.leaf(1000, 4, true);
        let gamma = t.external(10, 4, true);
        let y = t.fused(Fused::RmsNorm, &[x, gamma], 1000, 0);
        let s = t.sum(y, 1);
        t.end(&[s]);
        assert_eq!(t.mem.live, 2 * t32(1000) + t32(1));
        let before = t.mem.live;
        let store = t.backward(s);
        assert_eq!(t.mem.live - before, t32(1000) + t32(10));
        assert!(
            t.mem.peak >= before + t32(1010),
            "the packed gradient was allocated"
        );
        t.drop_store(store, None);
        assert_eq!(t.mem.live, before);
    }

    #[test]
    fn plan_tape_a_gradient_computed_with_a_forward_tensor_keeps_its_chain() {
        // y = x², loss = Σy: the gradient of the variable x is `zeros + (x · g)·2`, a recorded
        // chain that keeps the product and the zeros until the store is dropped (candle).
        let mut t = Tape::new();
        t.begin();
        let x = t.leaf(1000, 4, true);
        let y = t.unary(Un::Sqr, x);
        let s = t.sum(y, 1);
        t.end(&[s]);
        let before = t.mem.live;
        let store = t.backward(s);
        // Left in the store: the new sum, the zeros, the product, the affine and the detached
        // gradient of y (held by the product).
        let left = t.mem.live - before;
        let headers = 20 * (TENSOR_HEADER + STORAGE_HEADER);
        assert!((5 * 4000..6 * 4000 + headers).contains(&left), "{left}");
        t.drop_store(store, None);
        assert_eq!(t.mem.live, before);
    }
}
