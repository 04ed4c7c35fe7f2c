//! Safe readers for weight files: PyTorch `.pth`/`.pt` checkpoints (zip format of torch ≥ 1.6
//! and the legacy pre-zip format) and safetensors.
//!
//! A `.pth` file is a Python pickle, and unpickling normally runs arbitrary code. This reader
//! never executes anything: it interprets the handful of pickle opcodes a state dict needs and
//! accepts only a whitelist of globals (`torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, `collections.OrderedDict`, `torch.*Storage`). Any other
//! global is an error naming the file.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// Loads a weights file by extension: `.safetensors` → [`load_safetensors`], `.pth`/`.pt`/`.bin`/
/// `.ckpt` → [`load_pth`]. Tensors keep their stored dtype (f16 stays f16); models cast on use.
pub fn load_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => load_safetensors(path),
        "pth" | "pt" | "bin" | "ckpt" | "tar" => load_pth(path),
        _ => bail!("{}: unknown weights file extension {:?} (expected .safetensors, .pth, .pt, .bin or .ckpt)", path.display(), ext),
    }
}

/// Loads every tensor of a safetensors file onto the CPU. Errors name the file (and tensor).
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read weights file", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: not a valid safetensors file (truncated or corrupt?): {e:?}", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        use safetensors::Dtype as S;
        let dtype = match view.dtype() {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F64 => DType::F64,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I16 => DType::I16,
            S::U8 | S::BOOL => DType::U8,
            S::U32 => DType::U32,
            other => bail!("{}: tensor `{name}` has unsupported dtype {other:?}", path.display()),
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu).with_context(|| format!("{}: tensor `{name}`: cannot build tensor", path.display()))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Loads the tensors of a PyTorch checkpoint (zip or legacy format) without executing code.
/// Nested dicts (e.g. `{"state_dict": {...}}`) are flattened with `.`-joined keys; non-tensor
/// values are skipped.
pub fn load_pth(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read weights file", path.display()))?;
    load_pth_bytes(&bytes, path)
}

/// [`load_pth`] on bytes already in memory; `path` is only used in error messages.
pub fn load_pth_bytes(bytes: &[u8], path: &Path) -> Result<HashMap<String, Tensor>> {
    let p = path.display();
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        load_zip(bytes, path).with_context(|| format!("{p}: cannot load zip-format torch checkpoint"))
    } else if bytes.first() == Some(&0x80) {
        load_legacy(bytes, path).with_context(|| format!("{p}: cannot load legacy-format torch checkpoint"))
    } else {
        bail!("{p}: not a torch checkpoint (neither a zip archive nor a pickle)")
    }
}

/// Converts a `.pth` (or safetensors) file to safetensors, optionally casting floating-point
/// tensors to f16 (integer tensors such as `num_batches_tracked` keep their dtype). Written
/// atomically. Returns the number of tensors written.
pub fn convert_pth_to_safetensors(src: &Path, dst: &Path, f16: bool) -> Result<usize> {
    let tensors = load_weights(src)?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in tensors {
        let t = if f16 && t.dtype().is_float() && t.dtype() != DType::F16 { t.to_dtype(DType::F16).with_context(|| format!("{}: tensor `{name}`: cast to f16", src.display()))? } else { t };
        out.insert(name, t);
    }
    let n = out.len();
    crate::io::atomic_write_with(dst, |tmp| candle_core::safetensors::save(&out, tmp).with_context(|| format!("{}: cannot write safetensors", dst.display())))?;
    Ok(n)
}

/// A loaded weights file that remembers where it came from, so that every lookup error can
/// name the file and the tensor.
pub struct Weights {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
}

impl Weights {
    /// Loads `path` with [`load_weights`].
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self { path: path.to_path_buf(), tensors: load_weights(path)? })
    }
    /// Wraps tensors already in memory (tests, converted checkpoints).
    pub fn from_map(path: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Self { path: path.to_path_buf(), tensors }
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    /// The tensor `name` as f32 on CPU, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get_any(name)?;
        if t.dims() != shape {
            bail!("{}: tensor `{name}` has shape {:?}, expected {:?} (weights for a different architecture?)", self.path.display(), t.dims(), shape);
        }
        Ok(t)
    }
    /// The tensor `name` as f32 on CPU, any shape.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| anyhow!("{}: tensor `{name}` is missing (weights for a different architecture?)", self.path.display()))?;
        t.to_dtype(DType::F32).with_context(|| format!("{}: tensor `{name}`: cast to f32", self.path.display()))
    }
}

// ---------------------------------------------------------------------------------------------
// Pickle values and the opcode interpreter
// ---------------------------------------------------------------------------------------------

/// Element type of a torch storage.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Elem {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    U8,
    Bool,
}

impl Elem {
    fn from_storage_name(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Elem::F32,
            "DoubleStorage" => Elem::F64,
            "HalfStorage" => Elem::F16,
            "BFloat16Storage" => Elem::BF16,
            "LongStorage" => Elem::I64,
            "IntStorage" => Elem::I32,
            "ShortStorage" => Elem::I16,
            "ByteStorage" => Elem::U8,
            "BoolStorage" => Elem::Bool,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Elem::F64 | Elem::I64 => 8,
            Elem::F32 | Elem::I32 => 4,
            Elem::F16 | Elem::BF16 | Elem::I16 => 2,
            Elem::U8 | Elem::Bool => 1,
        }
    }
    fn dtype(self) -> DType {
        match self {
            Elem::F32 => DType::F32,
            Elem::F64 => DType::F64,
            Elem::F16 => DType::F16,
            Elem::BF16 => DType::BF16,
            Elem::I64 => DType::I64,
            Elem::I32 => DType::I32,
            Elem::I16 => DType::I16,
            Elem::U8 | Elem::Bool => DType::U8,
        }
    }
}

/// The only callables a checkpoint may reference.
#[derive(Clone, Debug, PartialEq)]
enum Global {
    RebuildTensorV2,
    RebuildParameter,
    OrderedDict,
    Storage(Elem),
}

#[derive(Debug)]
struct StorageRef {
    elem: Elem,
    key: String,
    /// Offset (in elements) into the root storage: non-zero only for legacy storage views.
    view_offset: usize,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Clone, Debug)]
#[allow(dead_code)] // float/bytes payloads are parsed for fidelity but no state dict needs them
enum Val {
    None,
    Bool(bool),
    Int(i64),
    /// LONG1/LONG4 too large for i64: little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Val>>),
    List(Rc<RefCell<Vec<Val>>>),
    Dict(Rc<RefCell<Vec<(Val, Val)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Val {
    fn kind(&self) -> &'static str {
        match self {
            Val::None => "None",
            Val::Bool(_) => "bool",
            Val::Int(_) | Val::BigInt(_) => "int",
            Val::Float(_) => "float",
            Val::Str(_) => "str",
            Val::Bytes(_) => "bytes",
            Val::Tuple(_) => "tuple",
            Val::List(_) => "list",
            Val::Dict(_) => "dict",
            Val::Global(_) => "global",
            Val::Storage(_) => "storage",
            Val::Tensor(_) => "tensor",
        }
    }
    fn as_usize(&self, what: &str) -> Result<usize> {
        match self {
            Val::Int(i) if *i >= 0 => Ok(*i as usize),
            Val::Bool(b) => Ok(*b as usize),
            v => bail!("{what}: expected a non-negative int, found {}", v.kind()),
        }
    }
    fn as_usize_tuple(&self, what: &str) -> Result<Vec<usize>> {
        match self {
            Val::Tuple(t) => t.iter().map(|v| v.as_usize(what)).collect(),
            Val::List(l) => l.borrow().iter().map(|v| v.as_usize(what)).collect(),
            v => bail!("{what}: expected a tuple of ints, found {}", v.kind()),
        }
    }
}

/// A byte cursor whose reads fail with "truncated" instead of panicking.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| anyhow!("file truncated: wanted {n} bytes at offset {}, file has {}", self.pos, self.b.len()))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn len_u64(&mut self) -> Result<usize> {
        usize::try_from(self.u64()?).map_err(|_| anyhow!("length does not fit in memory"))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.b[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or_else(|| anyhow!("file truncated inside a text line"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| anyhow!("invalid UTF-8 in pickle text"))?;
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| anyhow!("invalid UTF-8 in pickle string"))
    }
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    Ok(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch", s) if Elem::from_storage_name(s).is_some() => Global::Storage(Elem::from_storage_name(s).unwrap_or(Elem::F32)),
        _ => bail!(
            "pickle references `{module}.{name}`, which is not on the whitelist of a plain state dict; \
             refusing to load it (unpickling it could run arbitrary code)"
        ),
    })
}

/// Interprets one pickle (up to STOP) starting at the cursor. `persistent` turns a BINPERSID id
/// into a value (the storage of a tensor).
fn unpickle(c: &mut Cursor, persistent: &mut dyn FnMut(Val) -> Result<Val>) -> Result<Val> {
    let mut stack: Vec<Val> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u64, Val> = HashMap::new();
    fn pop(stack: &mut Vec<Val>) -> Result<Val> {
        stack.pop().ok_or_else(|| anyhow!("pickle stack underflow (garbled file?)"))
    }
    fn pop_mark(stack: &mut Vec<Val>, marks: &mut Vec<usize>) -> Result<Vec<Val>> {
        let m = marks.pop().ok_or_else(|| anyhow!("pickle MARK missing (garbled file?)"))?;
        if m > stack.len() {
            bail!("pickle MARK beyond stack (garbled file?)");
        }
        Ok(stack.split_off(m))
    }
    fn top(stack: &mut [Val]) -> Result<&mut Val> {
        stack.last_mut().ok_or_else(|| anyhow!("pickle stack underflow (garbled file?)"))
    }
    fn append(target: &Val, items: Vec<Val>) -> Result<()> {
        let Val::List(l) = target else { bail!("pickle APPEND(S) on a {}, expected list", target.kind()) };
        l.borrow_mut().extend(items);
        Ok(())
    }
    loop {
        let at = c.pos;
        let op = c.u8()?;
        match op {
            0x80 => {
                let proto = c.u8()?; // PROTO
                if proto > 5 {
                    bail!("unsupported pickle protocol {proto}");
                }
            }
            0x95 => {
                c.u64()?; // FRAME: only a size hint for buffered readers
            }
            b'.' => return pop(&mut stack),  // STOP
            b'(' => marks.push(stack.len()), // MARK
            b'}' => stack.push(Val::Dict(Rc::new(RefCell::new(Vec::new())))),
            b']' => stack.push(Val::List(Rc::new(RefCell::new(Vec::new())))),
            b')' => stack.push(Val::Tuple(Rc::new(Vec::new()))),
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Val::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize; // TUPLE1..3
                if stack.len() < n {
                    bail!("pickle stack underflow in TUPLE{n}");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Val::Tuple(Rc::new(items)));
            }
            b'l' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Val::List(Rc::new(RefCell::new(items))));
            }
            b'd' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                let d = Val::Dict(Rc::new(RefCell::new(Vec::new())));
                set_items(&d, items)?;
                stack.push(d);
            }
            b'N' => stack.push(Val::None),
            0x88 => stack.push(Val::Bool(true)),
            0x89 => stack.push(Val::Bool(false)),
            b'J' => stack.push(Val::Int(c.u32()? as i32 as i64)),
            b'K' => stack.push(Val::Int(c.u8()? as i64)),
            b'M' => stack.push(Val::Int(c.u16()? as i64)),
            0x8a | 0x8b => {
                let n = if op == 0x8a { c.u8()? as usize } else { c.u32()? as usize };
                let b = c.take(n)?;
                if n <= 8 {
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                    buf[..n].copy_from_slice(b);
                    stack.push(Val::Int(i64::from_le_bytes(buf)));
                } else {
                    stack.push(Val::BigInt(b.to_vec()));
                }
            }
            b'G' => stack.push(Val::Float(f64::from_be_bytes(c.take(8)?.try_into()?))),
            b'X' => {
                let n = c.u32()? as usize;
                stack.push(Val::Str(c.utf8(n)?));
            }
            0x8c => {
                let n = c.u8()? as usize;
                stack.push(Val::Str(c.utf8(n)?));
            }
            0x8d => {
                let n = c.len_u64()?;
                stack.push(Val::Str(c.utf8(n)?));
            }
            b'U' => {
                let n = c.u8()? as usize;
                stack.push(Val::Bytes(c.take(n)?.to_vec()));
            }
            b'T' | b'B' => {
                let n = c.u32()? as usize;
                stack.push(Val::Bytes(c.take(n)?.to_vec()));
            }
            b'C' => {
                let n = c.u8()? as usize;
                stack.push(Val::Bytes(c.take(n)?.to_vec()));
            }
            0x8e => {
                let n = c.len_u64()?;
                stack.push(Val::Bytes(c.take(n)?.to_vec()));
            }
            b'q' => {
                let k = c.u8()? as u64;
                memo.insert(k, top(&mut stack)?.clone());
            }
            b'r' => {
                let k = c.u32()? as u64;
                memo.insert(k, top(&mut stack)?.clone());
            }
            0x94 => {
                let k = memo.len() as u64; // MEMOIZE
                memo.insert(k, top(&mut stack)?.clone());
            }
            b'h' | b'j' => {
                let k = if op == b'h' { c.u8()? as u64 } else { c.u32()? as u64 };
                let v = memo.get(&k).ok_or_else(|| anyhow!("pickle memo entry {k} missing (garbled file?)"))?;
                stack.push(v.clone());
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack, &mut marks)?;
            }
            b'2' => {
                let v = top(&mut stack)?.clone();
                stack.push(v);
            }
            b'c' => {
                let module = c.line()?.to_string();
                let name = c.line()?.to_string();
                stack.push(Val::Global(resolve_global(&module, &name)?));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                let (Val::Str(m), Val::Str(n)) = (&module, &name) else {
                    bail!("pickle STACK_GLOBAL with non-string operands");
                };
                stack.push(Val::Global(resolve_global(m, n)?));
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                let Val::Tuple(args) = args else { bail!("pickle REDUCE with {} arguments, expected tuple", args.kind()) };
                stack.push(reduce(&func, &args)?);
            }
            b'b' => {
                // BUILD sets object state (e.g. the `_metadata` of a state dict): irrelevant here.
                pop(&mut stack)?;
                top(&mut stack)?;
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                set_items(top(&mut stack)?, vec![k, v])?;
            }
            b'u' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                set_items(top(&mut stack)?, items)?;
            }
            b'a' => {
                let v = pop(&mut stack)?;
                append(top(&mut stack)?, vec![v])?;
            }
            b'e' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                append(top(&mut stack)?, items)?;
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent(pid)?);
            }
            _ => bail!("unsupported pickle opcode 0x{op:02x} at byte {at} (not a plain state dict, or garbled file)"),
        }
    }
}

fn reduce(func: &Val, args: &[Val]) -> Result<Val> {
    let Val::Global(g) = func else { bail!("pickle REDUCE on a {}, expected a whitelisted global", func.kind()) };
    match g {
        Global::OrderedDict => {
            let d = Val::Dict(Rc::new(RefCell::new(Vec::new())));
            // OrderedDict(iterable of pairs) is legal but torch never writes it; support it anyway.
            if let Some(Val::List(items)) = args.first() {
                for it in items.borrow().iter() {
                    if let Val::Tuple(kv) = it {
                        if kv.len() == 2 {
                            set_items(&d, vec![kv[0].clone(), kv[1].clone()])?;
                        }
                    }
                }
            }
            Ok(d)
        }
        Global::RebuildTensorV2 => {
            if args.len() < 4 {
                bail!("_rebuild_tensor_v2 with {} arguments, expected ≥ 4", args.len());
            }
            let Val::Storage(storage) = &args[0] else { bail!("_rebuild_tensor_v2: first argument is a {}, expected a storage", args[0].kind()) };
            let offset = args[1].as_usize("_rebuild_tensor_v2 storage offset")?;
            let shape = args[2].as_usize_tuple("_rebuild_tensor_v2 size")?;
            let stride = args[3].as_usize_tuple("_rebuild_tensor_v2 stride")?;
            if shape.len() != stride.len() {
                bail!("_rebuild_tensor_v2: size {:?} and stride {:?} differ in rank", shape, stride);
            }
            Ok(Val::Tensor(Rc::new(TensorRef { storage: storage.clone(), offset, shape, stride })))
        }
        Global::RebuildParameter => match args.first() {
            Some(t @ Val::Tensor(_)) => Ok(t.clone()),
            _ => bail!("_rebuild_parameter without a tensor argument"),
        },
        Global::Storage(_) => bail!("pickle calls a storage type directly (not a plain state dict)"),
    }
}

fn set_items(target: &Val, items: Vec<Val>) -> Result<()> {
    let Val::Dict(d) = target else { bail!("pickle SETITEM(S) on a {}, expected dict", target.kind()) };
    if !items.len().is_multiple_of(2) {
        bail!("pickle SETITEMS with an odd number of items (garbled file?)");
    }
    let mut d = d.borrow_mut();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.push((k, v));
    }
    Ok(())
}

/// Decodes a persistent id `('storage', StorageType, key, location, numel[, view_metadata])`.
fn storage_from_pid(pid: Val) -> Result<Val> {
    let Val::Tuple(t) = &pid else { bail!("persistent id is a {}, expected a tuple", pid.kind()) };
    if t.len() < 5 || !matches!(&t[0], Val::Str(s) if s == "storage") {
        bail!("persistent id is not a ('storage', ...) tuple");
    }
    let Val::Global(Global::Storage(elem)) = &t[1] else { bail!("persistent id: second item is not a torch storage type") };
    let key = match &t[2] {
        Val::Str(s) => s.clone(),
        Val::Int(i) => i.to_string(),
        v => bail!("persistent id: storage key is a {}", v.kind()),
    };
    // Legacy files may describe a view into another storage: (view_key, offset, view_size).
    let (key, view_offset) = match t.get(5) {
        Some(Val::Tuple(view)) if view.len() == 3 => {
            let off = view[1].as_usize("storage view offset")?;
            (key, off)
        }
        _ => (key, 0),
    };
    Ok(Val::Storage(Rc::new(StorageRef { elem: *elem, key, view_offset })))
}

/// Walks the unpickled object and collects `name → tensor reference`, flattening nested dicts.
fn collect_tensors(v: &Val, prefix: &str, out: &mut BTreeMap<String, Rc<TensorRef>>) -> Result<()> {
    match v {
        Val::Dict(d) => {
            for (k, v) in d.borrow().iter() {
                let k = match k {
                    Val::Str(s) => s.clone(),
                    Val::Int(i) => i.to_string(),
                    _ => continue,
                };
                let name = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                collect_tensors(v, &name, out)?;
            }
        }
        Val::Tensor(t) => {
            out.insert(prefix.to_string(), t.clone());
        }
        _ => {}
    }
    Ok(())
}

/// Copies a (possibly strided, offset) tensor out of its storage's raw little-endian bytes.
fn materialize(name: &str, t: &TensorRef, storage: &[u8]) -> Result<Tensor> {
    let es = t.storage.elem.size();
    let numel_storage = storage.len() / es;
    let numel: usize = t.shape.iter().product();
    let start = t.storage.view_offset + t.offset;
    if numel > 0 {
        let last = start + t.shape.iter().zip(&t.stride).map(|(&n, &s)| (n - 1) * s).sum::<usize>();
        if last >= numel_storage {
            bail!("tensor `{name}`: shape {:?} stride {:?} offset {start} reaches element {last}, but storage `{}` has {numel_storage} (truncated file?)", t.shape, t.stride, t.storage.key);
        }
    }
    let contiguous = {
        let mut expect = 1;
        let mut ok = true;
        for (&n, &s) in t.shape.iter().zip(&t.stride).rev() {
            if n != 1 && s != expect {
                ok = false;
            }
            expect *= n;
        }
        ok
    };
    let bytes: std::borrow::Cow<[u8]> = if contiguous {
        std::borrow::Cow::Borrowed(&storage[start * es..(start + numel) * es])
    } else {
        let mut out = Vec::with_capacity(numel * es);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let e = start + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&storage[e * es..(e + 1) * es]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        std::borrow::Cow::Owned(out)
    };
    let tensor =
        if t.storage.elem == Elem::Bool { Tensor::from_raw_buffer(&bytes, DType::U8, &t.shape, &Device::Cpu) } else { Tensor::from_raw_buffer(&bytes, t.storage.elem.dtype(), &t.shape, &Device::Cpu) };
    tensor.with_context(|| format!("tensor `{name}`: cannot build tensor"))
}

// ---------------------------------------------------------------------------------------------
// Zip format (torch ≥ 1.6): <prefix>/data.pkl + <prefix>/data/<key>, entries stored uncompressed
// ---------------------------------------------------------------------------------------------

/// Minimal zip central-directory reader: name → (data offset, size) for stored entries.
fn zip_entries(b: &[u8]) -> Result<HashMap<String, (usize, usize)>> {
    const EOCD: u32 = 0x0605_4b50;
    let min = b.len().saturating_sub(22 + 65535);
    let eocd = (min..=b.len().saturating_sub(22))
        .rev()
        .find(|&i| b.len() >= i + 4 && u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) == EOCD)
        .ok_or_else(|| anyhow!("zip end-of-central-directory not found (truncated file?)"))?;
    let mut c = Cursor { b, pos: eocd + 10 };
    let mut count = c.u16()? as u64;
    let _cd_size = c.u32()?;
    let mut cd_off = c.u32()? as u64;
    if count == 0xffff || cd_off == 0xffff_ffff {
        // Zip64: the locator sits just before the EOCD record.
        let loc = eocd.checked_sub(20).ok_or_else(|| anyhow!("zip64 locator missing"))?;
        let mut c = Cursor { b, pos: loc };
        if c.u32()? != 0x0706_4b50 {
            bail!("zip64 locator missing (garbled file?)");
        }
        c.u32()?;
        let z64 = c.len_u64()?;
        let mut c = Cursor { b, pos: z64 };
        if c.u32()? != 0x0606_4b50 {
            bail!("zip64 end-of-central-directory record missing (garbled file?)");
        }
        c.take(20)?;
        c.u64()?; // entries on this disk
        count = c.u64()?;
        c.u64()?; // size of central directory
        cd_off = c.u64()?;
    }
    let mut out = HashMap::new();
    let mut c = Cursor { b, pos: usize::try_from(cd_off)? };
    for _ in 0..count {
        if c.u32()? != 0x0201_4b50 {
            bail!("zip central directory entry garbled");
        }
        c.take(6)?;
        let method = c.u16()?;
        c.take(8)?;
        let mut csize = c.u32()? as u64;
        let mut usize_ = c.u32()? as u64;
        let nlen = c.u16()? as usize;
        let elen = c.u16()? as usize;
        let clen = c.u16()? as usize;
        c.take(8)?;
        let mut local = c.u32()? as u64;
        let name = String::from_utf8_lossy(c.take(nlen)?).into_owned();
        let extra = c.take(elen)?;
        c.take(clen)?;
        // Zip64 extended information: present fields replace the 0xffffffff placeholders, in order.
        let mut e = Cursor { b: extra, pos: 0 };
        while e.pos + 4 <= extra.len() {
            let id = e.u16()?;
            let sz = e.u16()? as usize;
            let body = e.take(sz)?;
            if id == 1 {
                let mut z = Cursor { b: body, pos: 0 };
                if usize_ == 0xffff_ffff {
                    usize_ = z.u64()?;
                }
                if csize == 0xffff_ffff {
                    csize = z.u64()?;
                }
                if local == 0xffff_ffff {
                    local = z.u64()?;
                }
            }
        }
        if method != 0 {
            // Torch writes stored entries; a compressed one means someone re-zipped the file.
            out.insert(name, (usize::MAX, method as usize));
            continue;
        }
        let _ = csize;
        let mut l = Cursor { b, pos: usize::try_from(local)? };
        if l.u32()? != 0x0403_4b50 {
            bail!("zip local header of `{name}` garbled");
        }
        l.take(22)?;
        let ln = l.u16()? as usize;
        let le = l.u16()? as usize;
        let data = l.pos + ln + le;
        let size = usize::try_from(usize_)?;
        if data.checked_add(size).is_none_or(|end| end > b.len()) {
            bail!("zip entry `{name}` runs past the end of the file (truncated file?)");
        }
        out.insert(name, (data, size));
    }
    Ok(out)
}

fn load_zip(bytes: &[u8], path: &Path) -> Result<HashMap<String, Tensor>> {
    let entries = zip_entries(bytes)?;
    let pkl = entries.keys().filter(|k| k.ends_with("/data.pkl") || k.as_str() == "data.pkl").min_by_key(|k| k.len()).cloned().ok_or_else(|| anyhow!("no data.pkl in the archive"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Some(&(off, n)) = entries.get(&format!("{prefix}byteorder")) {
        if off != usize::MAX && &bytes[off..off + n] != b"little" {
            bail!("checkpoint was written big-endian; only little-endian is supported");
        }
    }
    let get = |name: &str| -> Result<&[u8]> {
        match entries.get(name) {
            Some(&(usize::MAX, m)) => {
                bail!("zip entry `{name}` is compressed (method {m}); torch writes stored entries")
            }
            Some(&(off, n)) => Ok(&bytes[off..off + n]),
            None => bail!("zip entry `{name}` missing (truncated or garbled archive?)"),
        }
    };
    let mut c = Cursor { b: get(&pkl)?, pos: 0 };
    let root = unpickle(&mut c, &mut storage_from_pid).with_context(|| format!("{pkl}: cannot interpret pickle"))?;
    let mut refs = BTreeMap::new();
    collect_tensors(&root, "", &mut refs)?;
    let mut out = HashMap::new();
    for (name, t) in refs {
        let data = get(&format!("{prefix}data/{}", t.storage.key)).with_context(|| format!("tensor `{name}`"))?;
        out.insert(name.clone(), materialize(&name, &t, data)?);
    }
    let _ = path;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Legacy format: magic, protocol, sys-info, state pickle, storage-key list, raw storages
// ---------------------------------------------------------------------------------------------

/// `torch.serialization.MAGIC_NUMBER` = 0x1950a86a20f9469cfc6c, little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn load_legacy(bytes: &[u8], path: &Path) -> Result<HashMap<String, Tensor>> {
    let _ = path;
    let mut c = Cursor { b: bytes, pos: 0 };
    let mut no_pid = |_: Val| -> Result<Val> { bail!("unexpected persistent id in header pickle") };
    let magic = unpickle(&mut c, &mut no_pid).context("magic number")?;
    match &magic {
        Val::BigInt(b) if b.as_slice() == LEGACY_MAGIC => {}
        _ => bail!("bad magic number: not a torch checkpoint"),
    }
    match unpickle(&mut c, &mut no_pid).context("protocol version")? {
        Val::Int(1001) => {}
        v => bail!("unsupported legacy protocol version ({v:?})"),
    }
    let sys = unpickle(&mut c, &mut no_pid).context("sys info")?;
    if let Val::Dict(d) = &sys {
        for (k, v) in d.borrow().iter() {
            if matches!(k, Val::Str(s) if s == "little_endian") && matches!(v, Val::Bool(false)) {
                bail!("checkpoint was written big-endian; only little-endian is supported");
            }
        }
    }
    let mut elems: HashMap<String, Elem> = HashMap::new();
    let mut pid = |p: Val| -> Result<Val> {
        let s = storage_from_pid(p)?;
        if let Val::Storage(s) = &s {
            elems.insert(s.key.clone(), s.elem);
        }
        Ok(s)
    };
    let root = unpickle(&mut c, &mut pid).context("state-dict pickle")?;
    let keys = unpickle(&mut c, &mut no_pid).context("storage key list")?;
    let keys: Vec<String> = match keys {
        Val::List(l) => l
            .borrow()
            .iter()
            .map(|v| match v {
                Val::Str(s) => Ok(s.clone()),
                v => bail!("storage key list holds a {}", v.kind()),
            })
            .collect::<Result<_>>()?,
        v => bail!("storage key list is a {}", v.kind()),
    };
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in &keys {
        let elem = *elems.get(key).ok_or_else(|| anyhow!("storage `{key}` listed but never referenced"))?;
        let numel = c.len_u64().with_context(|| format!("storage `{key}` size"))?;
        let n = numel.checked_mul(elem.size()).ok_or_else(|| anyhow!("storage `{key}` too large"))?;
        let data = c.take(n).with_context(|| format!("storage `{key}` data ({numel} elements)"))?;
        storages.insert(key.clone(), data);
    }
    let mut refs = BTreeMap::new();
    collect_tensors(&root, "", &mut refs)?;
    let mut out = HashMap::new();
    for (name, t) in refs {
        let data = storages.get(&t.storage.key).ok_or_else(|| anyhow!("tensor `{name}`: storage `{}` missing (truncated file?)", t.storage.key))?;
        out.insert(name.clone(), materialize(&name, &t, data)?);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    // --- a tiny pickle writer emitting the same opcodes torch does -------------------------------

    struct P(Vec<u8>);
    impl P {
        fn new() -> Self {
            P(vec![0x80, 2])
        }
        fn op(&mut self, b: u8) -> &mut Self {
            self.0.push(b);
            self
        }
        fn global(&mut self, m: &str, n: &str) -> &mut Self {
            self.0.push(b'c');
            self.0.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
            self
        }
        fn s(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn int(&mut self, i: usize) -> &mut Self {
            if i < 256 {
                self.0.extend_from_slice(&[b'K', i as u8]);
            } else if i < 65536 {
                self.0.push(b'M');
                self.0.extend_from_slice(&(i as u16).to_le_bytes());
            } else {
                self.0.push(b'J');
                self.0.extend_from_slice(&(i as u32).to_le_bytes());
            }
            self
        }
        fn tuple(&mut self, xs: &[usize]) -> &mut Self {
            self.op(b'(');
            for &x in xs {
                self.int(x);
            }
            self.op(b't')
        }
    }

    struct T {
        name: String,
        storage: String,
        storage_type: &'static str,
        offset: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
    }

    /// A state-dict pickle like torch's: OrderedDict of _rebuild_tensor_v2 calls.
    fn state_pickle(ts: &[T], numel: &HashMap<String, usize>, legacy: bool) -> Vec<u8> {
        let mut p = P::new();
        p.global("collections", "OrderedDict").op(b'q').op(0).op(b')').op(b'R').op(b'(');
        for (i, t) in ts.iter().enumerate() {
            p.s(&t.name);
            // Exercise the memo: the first tensor stores the global, later ones fetch it.
            if i == 0 {
                p.global("torch._utils", "_rebuild_tensor_v2").op(b'q').op(1);
            } else {
                p.op(b'h').op(1);
            }
            p.op(b'(').op(b'(').s("storage").global("torch", t.storage_type).s(&t.storage).s("cpu").int(numel[&t.storage]);
            if legacy {
                p.op(b'N');
            }
            p.op(b't').op(b'Q').int(t.offset).tuple(&t.shape).tuple(&t.stride).op(0x89);
            p.op(b'h').op(0).op(b')').op(b'R').op(b't').op(b'R');
        }
        p.op(b'u').op(b'.');
        p.0
    }

    fn stored_zip(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in files {
            let off = out.len() as u32;
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]);
            central.extend_from_slice(&off.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_off = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&(files.len() as u16).to_le_bytes());
        out.extend_from_slice(&(files.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_off.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Storage "0": 12 f32 (0..12) shared by a contiguous 2×3 at offset 2 and a transposed view;
    /// "1": f16; "2": bf16; "3": i64.
    type Fixture = (Vec<T>, HashMap<String, usize>, HashMap<String, Vec<u8>>);

    fn fixture() -> Fixture {
        let ts = vec![
            T { name: "a.weight".into(), storage: "0".into(), storage_type: "FloatStorage", offset: 2, shape: vec![2, 3], stride: vec![3, 1] },
            T { name: "a.t".into(), storage: "0".into(), storage_type: "FloatStorage", offset: 0, shape: vec![3, 2], stride: vec![1, 3] },
            T { name: "h".into(), storage: "1".into(), storage_type: "HalfStorage", offset: 1, shape: vec![2], stride: vec![1] },
            T { name: "b".into(), storage: "2".into(), storage_type: "BFloat16Storage", offset: 0, shape: vec![2], stride: vec![1] },
            T { name: "n".into(), storage: "3".into(), storage_type: "LongStorage", offset: 0, shape: vec![], stride: vec![] },
        ];
        let numel = HashMap::from([("0", 12), ("1", 3), ("2", 2), ("3", 1)].map(|(k, n)| (k.to_string(), n)));
        // f16 bits of 9.0, 0.5, -2.0 and bf16 bits of 1.5, -3.0 (no `half` dependency here).
        let h = |bits: u16| bits.to_le_bytes();
        let data = HashMap::from(
            [
                ("0", f32_bytes(&(0..12).map(|i| i as f32).collect::<Vec<_>>())),
                ("1", [h(0x4880), h(0x3800), h(0xc000)].concat()),
                ("2", [h(0x3fc0), h(0xc040)].concat()),
                ("3", 42i64.to_le_bytes().to_vec()),
            ]
            .map(|(k, d)| (k.to_string(), d)),
        );
        (ts, numel, data)
    }

    fn check_fixture(m: &HashMap<String, Tensor>) {
        assert_eq!(m.len(), 5);
        assert_eq!(m["a.weight"].to_vec2::<f32>().unwrap(), vec![vec![2., 3., 4.], vec![5., 6., 7.]]);
        assert_eq!(m["a.t"].to_vec2::<f32>().unwrap(), vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]);
        assert_eq!(m["h"].dtype(), DType::F16);
        assert_eq!(m["h"].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), vec![0.5, -2.0]);
        assert_eq!(m["b"].dtype(), DType::BF16);
        assert_eq!(m["b"].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), vec![1.5, -3.0]);
        assert_eq!(m["n"].dtype(), DType::I64);
        assert_eq!(m["n"].to_vec0::<i64>().unwrap(), 42);
    }

    fn zip_from((ts, numel, data): &Fixture, keys: &[&str]) -> Vec<u8> {
        let pkl = state_pickle(ts, numel, false);
        let mut files: Vec<(String, Vec<u8>)> = vec![("model/data.pkl".into(), pkl), ("model/byteorder".into(), b"little".to_vec())];
        for k in keys {
            files.push((format!("model/data/{k}"), data[*k].clone()));
        }
        files.push(("model/version".into(), b"3\n".to_vec()));
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        stored_zip(&refs)
    }

    fn legacy_from((ts, numel, data): &Fixture, order: &[&str]) -> Vec<u8> {
        let mut out = vec![0x80, 2, 0x8a, 10];
        out.extend_from_slice(&LEGACY_MAGIC);
        out.push(b'.');
        out.extend_from_slice(&[0x80, 2, b'M', 0xe9, 0x03, b'.']);
        let mut sys = P::new();
        sys.op(b'}').op(b'(').s("protocol_version").int(1001).s("little_endian").op(0x88).op(b'u').op(b'.');
        out.extend_from_slice(&sys.0);
        out.extend_from_slice(&state_pickle(ts, numel, true));
        let mut keys = P::new();
        keys.op(b']').op(b'(');
        for k in order {
            keys.s(k);
        }
        keys.op(b'e').op(b'.');
        out.extend_from_slice(&keys.0);
        for k in order {
            out.extend_from_slice(&(numel[*k] as u64).to_le_bytes());
            out.extend_from_slice(&data[*k]);
        }
        out
    }

    fn zip_bytes() -> Vec<u8> {
        zip_from(&fixture(), &["0", "1", "2", "3"])
    }

    fn legacy_bytes() -> Vec<u8> {
        legacy_from(&fixture(), &["3", "0", "2", "1"]) // storage order is the key list's, not sorted
    }

    /// A torch checkpoint (zip or legacy format, one storage per tensor, as `torch.save` of a
    /// state dict writes it) holding `tensors` (f32 or i64), for loader tests elsewhere.
    pub(crate) fn torch_checkpoint_bytes(tensors: &HashMap<String, Tensor>, legacy: bool) -> Vec<u8> {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let (mut ts, mut numel, mut data) = (Vec::new(), HashMap::new(), HashMap::new());
        for (i, name) in names.iter().enumerate() {
            let t = &tensors[*name];
            let flat = t.flatten_all().unwrap();
            let (ty, bytes): (&'static str, Vec<u8>) = match t.dtype() {
                DType::F32 => ("FloatStorage", f32_bytes(&flat.to_vec1::<f32>().unwrap())),
                DType::I64 => ("LongStorage", flat.to_vec1::<i64>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect()),
                other => panic!("torch_checkpoint_bytes: unsupported dtype {other:?}"),
            };
            let dims = t.dims().to_vec();
            let mut stride = vec![1usize; dims.len()];
            for d in (0..dims.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * dims[d + 1];
            }
            let key = i.to_string();
            numel.insert(key.clone(), t.elem_count());
            data.insert(key.clone(), bytes);
            ts.push(T { name: (*name).clone(), storage: key, storage_type: ty, offset: 0, shape: dims, stride });
        }
        let keys: Vec<String> = (0..names.len()).map(|i| i.to_string()).collect();
        let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        let fx = (ts, numel, data);
        if legacy {
            legacy_from(&fx, &keys)
        } else {
            zip_from(&fx, &keys)
        }
    }

    #[test]
    #[ignore]
    fn convert_real_checkpoint() {
        let (Ok(src), Ok(dst)) = (std::env::var("VIPO_CONVERT_SRC"), std::env::var("VIPO_CONVERT_DST")) else {
            panic!("set VIPO_CONVERT_SRC and VIPO_CONVERT_DST");
        };
        let n = convert_pth_to_safetensors(Path::new(&src), Path::new(&dst), true).unwrap();
        let a = load_weights(Path::new(&src)).unwrap();
        let b = load_weights(Path::new(&dst)).unwrap();
        assert_eq!(a.len(), n);
        // Relative error on tensors of non-negligible scale; absolute error everywhere (some BN
        // statistics are ~1e-7, i.e. f16 subnormals, where only the absolute error means anything).
        let (mut worst_rel, mut worst_abs) = (0f32, 0f32);
        for (k, t) in &a {
            let u = &b[k];
            assert_eq!(t.dims(), u.dims(), "{k}");
            if t.dtype().is_float() {
                let t = t.to_dtype(DType::F32).unwrap();
                let d = (&t - u.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                let m = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                worst_abs = worst_abs.max(d);
                if m > 1e-3 {
                    worst_rel = worst_rel.max(d / m);
                }
            }
        }
        println!("converted {n} tensors from {src} to {dst}; f16 error: worst relative {worst_rel:e}, worst absolute {worst_abs:e}");
    }

    #[test]
    fn zip_checkpoint_with_offsets_strides_and_dtypes() {
        let m = load_pth_bytes(&zip_bytes(), Path::new("tiny.pth")).unwrap();
        check_fixture(&m);
    }

    #[test]
    fn legacy_checkpoint_with_offsets_strides_and_dtypes() {
        let m = load_pth_bytes(&legacy_bytes(), Path::new("tiny.pth")).unwrap();
        check_fixture(&m);
    }

    #[test]
    fn truncated_files_error_with_file_name() {
        for (kind, bytes) in [("zip", zip_bytes()), ("legacy", legacy_bytes())] {
            for cut in [bytes.len() - 3, bytes.len() / 2, 40] {
                let err = load_pth_bytes(&bytes[..cut], Path::new("cut.pth")).unwrap_err();
                let msg = format!("{err:#}");
                assert!(msg.contains("cut.pth"), "{kind} cut at {cut}: {msg}");
            }
        }
        // Cutting inside the last storage names the storage.
        let b = legacy_bytes();
        let msg = format!("{:#}", load_pth_bytes(&b[..b.len() - 2], Path::new("cut.pth")).unwrap_err());
        assert!(msg.contains("storage `1`") && msg.contains("truncated"), "{msg}");
    }

    #[test]
    fn refuses_non_whitelisted_globals() {
        let mut p = P::new();
        p.global("os", "system").s("echo pwned").op(0x85).op(b'R').op(b'.');
        let mut bytes = vec![0x80, 2, 0x8a, 10];
        bytes.extend_from_slice(&LEGACY_MAGIC);
        bytes.push(b'.');
        bytes.extend_from_slice(&[0x80, 2, b'M', 0xe9, 0x03, b'.', 0x80, 2, b'}', b'.']);
        bytes.extend_from_slice(&p.0);
        let msg = format!("{:#}", load_pth_bytes(&bytes, Path::new("evil.pth")).unwrap_err());
        assert!(msg.contains("evil.pth") && msg.contains("os.system") && msg.contains("whitelist"), "{msg}");
        let zip = stored_zip(&[("archive/data.pkl", &p.0)]);
        let msg = format!("{:#}", load_pth_bytes(&zip, Path::new("evil.pth")).unwrap_err());
        assert!(msg.contains("evil.pth") && msg.contains("os.system"), "{msg}");
    }

    #[test]
    fn out_of_bounds_view_names_the_tensor() {
        let (mut ts, numel, data) = fixture();
        ts[0].offset = 8; // 8 + 5 = 13 > 12 elements
        let pkl = state_pickle(&ts, &numel, false);
        let files = [("a/data.pkl", pkl.as_slice()), ("a/data/0", &data["0"]), ("a/data/1", &data["1"]), ("a/data/2", &data["2"]), ("a/data/3", &data["3"])];
        let msg = format!("{:#}", load_pth_bytes(&stored_zip(&files), Path::new("x.pth")).unwrap_err());
        assert!(msg.contains("x.pth") && msg.contains("a.weight"), "{msg}");
    }

    #[test]
    fn safetensors_roundtrip_convert_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("tiny.pth");
        std::fs::write(&src, legacy_bytes()).unwrap();
        let dst = dir.path().join("tiny.safetensors");
        assert_eq!(convert_pth_to_safetensors(&src, &dst, true).unwrap(), 5);
        let m = load_weights(&dst).unwrap();
        assert_eq!(m["a.weight"].dtype(), DType::F16);
        assert_eq!(m["n"].dtype(), DType::I64); // integers are not cast
        let w = Weights::from_map(&dst, m);
        assert_eq!(w.get("a.t", &[3, 2]).unwrap().to_vec2::<f32>().unwrap()[2], vec![2.0, 5.0]);
        let msg = format!("{:#}", w.get("a.t", &[2, 3]).unwrap_err());
        assert!(msg.contains("tiny.safetensors") && msg.contains("a.t") && msg.contains("[3, 2]"), "{msg}");
        let msg = format!("{:#}", w.get("nope", &[1]).unwrap_err());
        assert!(msg.contains("tiny.safetensors") && msg.contains("nope"), "{msg}");
        // Truncated safetensors.
        let bytes = std::fs::read(&dst).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
        let msg = format!("{:#}", load_weights(&cut).unwrap_err());
        assert!(msg.contains("cut.safetensors"), "{msg}");
        let msg = format!("{:#}", load_weights(&dir.path().join("w.onnx")).unwrap_err());
        assert!(msg.contains("w.onnx"), "{msg}");
    }
}
