//! The update as an XLA FFI handler, so a compiled JAX step runs the kernel
//! on XLA's own CPU buffers. When the parameters and state are donated (Keras's
//! JAX trainer donates them), XLA gives each result its operand's buffer and
//! the update is in place, with no copies; otherwise XLA copies first.
//!
//! Operands: three scalars that change every step, `step`, `learning_rate` and
//! `weight_decay` (then `seed`, with `stochastic`, and the id of registered
//! `host_state`, with the `host_state` flag: `crate::host_state`), then n buffers
//! each of `params`, `grads` (float32, bfloat16 or float16), `exp_avgs`,
//! `exp_avg_sqs` and, with AMSGrad, `amsgrad_max` (float32 or bfloat16).
//! With `param_copies`, n 16-bit buffers follow, which are not read. Results:
//! the updated `params`, `exp_avgs`, `exp_avg_sqs` (and `amsgrad_max`), each
//! aliased to its operand, then the `param_copies`, which receive the float32
//! params rounded to nearest (aliased to theirs, to be written in place).
//! Attributes: `beta_1`, `beta_2`, `epsilon`, `epsilon_mode`,
//! `weight_decay_mode`, `maximize`, `amsgrad` and, optionally, `decay_form`,
//! `param_copies`, `stochastic` (16-bit stores rounded stochastically) and
//! `host_state` (the state lists are host memory, not operands or results).
//!
//! The structs mirror `xla/ffi/api/c_api.h` (FFI API 0.1, a stable C ABI) as
//! far as the handler reads them. Everything is checked before the first write;
//! a bad call returns an XLA error, which JAX raises.

use crate::aliasing::{find_overlap, Region};
use crate::host_state::Held;
use crate::math::{DecayForm, DecayMode, EpsilonMode, Hyperparams, InvalidArgument};
use crate::{host_state, in_flight, parallel, simd, Rounding, TensorSlices};
use crate::{DType, Elements, ElementsRef};
use std::ffi::{c_char, c_int, c_void, CString};
use std::mem::{offset_of, size_of};

#[repr(C)]
struct ExtensionBase {
    struct_size: usize,
    kind: c_int,
    next: *mut ExtensionBase,
}

const EXTENSION_METADATA: c_int = 1;

#[repr(C)]
struct ApiVersion {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    major_version: c_int,
    minor_version: c_int,
}

/// An XLA error, created by XLA and owned by it once returned.
#[repr(C)]
pub struct XlaError {
    _opaque: [u8; 0],
}

#[repr(C)]
struct ErrorCreateArgs {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    message: *const c_char,
    errc: c_int,
}

const ERROR_INVALID_ARGUMENT: c_int = 3;
const ERROR_INTERNAL: c_int = 13;

/// The start of `XLA_FFI_Api`: the table of XLA's functions, of which the
/// handler calls only the first.
#[repr(C)]
pub struct Api {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    api_version: ApiVersion,
    internal_api: *const c_void,
    error_create: Option<unsafe extern "C" fn(*mut ErrorCreateArgs) -> *mut XlaError>,
}

#[repr(C)]
struct Buffer {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    dtype: c_int,
    data: *mut c_void,
    rank: i64,
    dims: *const i64,
}

const DTYPE_PRED: c_int = 1;
const DTYPE_S32: c_int = 4;
const DTYPE_S64: c_int = 5;
const DTYPE_U32: c_int = 8;
const DTYPE_F16: c_int = 10;
const DTYPE_F32: c_int = 11;
const DTYPE_BF16: c_int = 16;
const DTYPE_F64: c_int = 12;

/// An XLA dtype's name, for messages (`XLA_FFI_DataType` in c_api.h).
fn dtype_name(dtype: c_int) -> String {
    let name = match dtype {
        DTYPE_PRED => "bool",
        2 => "int8",
        3 => "int16",
        DTYPE_S32 => "int32",
        DTYPE_S64 => "int64",
        6 => "uint8",
        7 => "uint16",
        DTYPE_U32 => "uint32",
        9 => "uint64",
        DTYPE_F16 => "float16",
        DTYPE_F32 => "float32",
        DTYPE_F64 => "float64",
        15 => "complex64",
        DTYPE_BF16 => "bfloat16",
        18 => "complex128",
        19 => "float8_e5m2",
        20 => "float8_e4m3fn",
        _ => return format!("XLA dtype {dtype}"),
    };
    name.into()
}

/// `XLA_FFI_Args` and `XLA_FFI_Rets`, which share one layout.
#[repr(C)]
struct BufferList {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    size: i64,
    types: *const c_int,
    items: *const *mut c_void,
}

const TYPE_BUFFER: c_int = 1;

#[repr(C)]
struct ByteSpan {
    ptr: *const c_char,
    len: usize,
}

#[repr(C)]
struct Scalar {
    dtype: c_int,
    value: *const c_void,
}

#[repr(C)]
struct Attrs {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    size: i64,
    types: *const c_int,
    names: *const *const ByteSpan,
    attrs: *const *const c_void,
}

const ATTR_SCALAR: c_int = 3;
const ATTR_STRING: c_int = 4;

/// `XLA_FFI_CallFrame`, up to the attributes (later API versions append fields).
#[repr(C)]
pub struct CallFrame {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    api: *const Api,
    ctx: *mut c_void,
    stage: c_int,
    args: BufferList,
    rets: BufferList,
    attrs: Attrs,
}

const STAGE_EXECUTE: c_int = 3;

#[repr(C)]
struct Metadata {
    struct_size: usize,
    api_version: ApiVersion,
    traits: u32,
}

#[repr(C)]
struct MetadataExtension {
    base: ExtensionBase,
    metadata: *mut Metadata,
}

/// The FFI API version this handler is written against.
const API_MAJOR: c_int = 0;
const API_MINOR: c_int = 1;

/// The handler XLA calls: `XLA_FFI_Error* (XLA_FFI_CallFrame*)`.
///
/// # Safety
/// `frame` must be a call frame as XLA passes it, valid for the call.
pub unsafe extern "C" fn adamw_update(frame: *mut CallFrame) -> *mut XlaError {
    // A panic must not unwind into XLA's C++ frames.
    let outcome = std::panic::catch_unwind(|| {
        // SAFETY: the caller's contract.
        let frame = unsafe { &*frame };
        // SAFETY: the frame's extension chain is XLA's, valid for the call.
        if unsafe { answer_metadata_query(frame) } {
            return Ok(());
        }
        // SAFETY: the frame's lists and buffers are XLA's, valid for the call.
        unsafe { execute(frame) }
    });
    let (code, message) = match outcome {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err(e)) => (ERROR_INVALID_ARGUMENT, format!("keras_adamw: {e}")),
        Err(panic) => (
            ERROR_INTERNAL,
            format!("keras_adamw: the update failed: {}", panic_message(&*panic)),
        ),
    };
    // SAFETY: `frame.api` is XLA's function table, valid for the call.
    unsafe { create_error(frame, code, &message) }
}

/// What a caught panic said (its payload is a `&str` or a `String` when it says anything).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Fills in the metadata XLA asks for when the handler is registered.
///
/// # Safety
/// The frame's extension chain must be valid.
unsafe fn answer_metadata_query(frame: &CallFrame) -> bool {
    let mut extension = frame.extension_start;
    while !extension.is_null() {
        // SAFETY: a non-null link of XLA's chain.
        let base = unsafe { &*extension };
        if base.kind == EXTENSION_METADATA {
            // SAFETY: a metadata extension has this layout.
            let metadata = unsafe { (*extension.cast::<MetadataExtension>()).metadata };
            // SAFETY: XLA owns the metadata storage, which it sized in struct_size.
            if let Some(metadata) = unsafe { metadata.as_mut() } {
                if metadata.struct_size >= offset_of!(Metadata, traits) + size_of::<u32>() {
                    metadata.api_version.struct_size = size_of::<ApiVersion>();
                    metadata.api_version.extension_start = std::ptr::null_mut();
                    metadata.api_version.major_version = API_MAJOR;
                    metadata.api_version.minor_version = API_MINOR;
                    metadata.traits = 0;
                }
            }
            return true;
        }
        extension = base.next;
    }
    false
}

/// # Safety
/// `frame` and its api must be valid.
unsafe fn create_error(frame: *mut CallFrame, code: c_int, message: &str) -> *mut XlaError {
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let mut args = ErrorCreateArgs {
        struct_size: size_of::<ErrorCreateArgs>(),
        extension_start: std::ptr::null_mut(),
        message: message.as_ptr(),
        errc: code,
    };
    // SAFETY: the caller's contract; XLA copies the message.
    match unsafe { (*(*frame).api).error_create } {
        Some(error_create) => unsafe { error_create(&mut args) },
        None => std::ptr::null_mut(),
    }
}

fn invalid(argument: impl Into<String>, problem: impl Into<String>) -> InvalidArgument {
    InvalidArgument::new(argument, problem)
}

/// A buffer of the call, by list name and index.
struct Tensor {
    data: *mut u8,
    dtype: DType,
    dims: Vec<i64>,
    len: usize,
}

impl Tensor {
    fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

const FLOATS: &[DType] = &[DType::F32, DType::Bf16, DType::F16];
const STATE: &[DType] = &[DType::F32, DType::Bf16];
const HALVES: &[DType] = &[DType::Bf16, DType::F16];

/// The kernel's element type of an XLA dtype.
fn element_dtype(dtype: c_int) -> Option<DType> {
    match dtype {
        DTYPE_F32 => Some(DType::F32),
        DTYPE_BF16 => Some(DType::Bf16),
        DTYPE_F16 => Some(DType::F16),
        _ => None,
    }
}

/// # Safety
/// `list` must be one of the frame's valid lists.
unsafe fn buffer(list: &BufferList, index: usize) -> Result<&Buffer, InvalidArgument> {
    // SAFETY: the caller checked index < size; XLA's arrays hold `size` entries.
    let (kind, item) = unsafe { (*list.types.add(index), *list.items.add(index)) };
    if kind != TYPE_BUFFER || item.is_null() {
        return Err(invalid(format!("operand {index}"), "is not a buffer"));
    }
    // SAFETY: a buffer entry points at an XLA_FFI_Buffer.
    Ok(unsafe { &*item.cast::<Buffer>() })
}

/// # Safety
/// As for `buffer`.
unsafe fn tensor(
    list: &BufferList,
    index: usize,
    label: &str,
    allowed: &[DType],
) -> Result<Tensor, InvalidArgument> {
    // SAFETY: the caller's contract.
    let buffer = unsafe { buffer(list, index)? };
    let dtype = element_dtype(buffer.dtype)
        .filter(|dtype| allowed.contains(dtype))
        .ok_or_else(|| {
            let names: Vec<_> = allowed.iter().map(|d| d.name()).collect();
            invalid(
                label,
                format!(
                    "must be {}, got {}",
                    names.join(" or "),
                    dtype_name(buffer.dtype)
                ),
            )
        })?;
    let dims = if buffer.rank == 0 {
        Vec::new()
    } else {
        // SAFETY: XLA's dims array holds `rank` entries.
        unsafe { std::slice::from_raw_parts(buffer.dims, buffer.rank as usize) }.to_vec()
    };
    let len = dims
        .iter()
        .try_fold(1usize, |n, &d| {
            usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
        })
        .ok_or_else(|| invalid(label, format!("has bad dimensions {dims:?}")))?;
    let data = buffer.data.cast::<u8>();
    if len > 0 && (data.is_null() || !(data as usize).is_multiple_of(dtype.size())) {
        return Err(invalid(
            label,
            format!("is not an aligned {} buffer", dtype.name()),
        ));
    }
    Ok(Tensor {
        data,
        dtype,
        dims,
        len,
    })
}

/// A scalar operand as f64, from any float or integer dtype.
///
/// # Safety
/// As for `buffer`.
unsafe fn scalar_operand(
    list: &BufferList,
    index: usize,
    label: &str,
) -> Result<f64, InvalidArgument> {
    // SAFETY: the caller's contract.
    let buffer = unsafe { buffer(list, index)? };
    if buffer.rank != 0 || buffer.data.is_null() {
        return Err(invalid(label, "must be a scalar"));
    }
    // SAFETY: a rank-0 buffer holds one element of its dtype (read unaligned to be safe).
    unsafe { read_scalar(buffer.dtype, buffer.data) }.ok_or_else(|| {
        invalid(
            label,
            format!("has unsupported dtype {}", dtype_name(buffer.dtype)),
        )
    })
}

/// # Safety
/// `value` must point at one element of `dtype`.
unsafe fn read_scalar(dtype: c_int, value: *const c_void) -> Option<f64> {
    // SAFETY: the caller's contract.
    unsafe {
        Some(match dtype {
            DTYPE_PRED => f64::from(value.cast::<u8>().read() != 0),
            DTYPE_S32 => f64::from(value.cast::<i32>().read_unaligned()),
            DTYPE_S64 => value.cast::<i64>().read_unaligned() as f64,
            DTYPE_U32 => f64::from(value.cast::<u32>().read_unaligned()),
            DTYPE_F32 => f64::from(value.cast::<f32>().read_unaligned()),
            DTYPE_F64 => value.cast::<f64>().read_unaligned(),
            _ => return None,
        })
    }
}

enum Attr {
    Number(f64),
    Text(String),
}

/// The call's attributes by name.
///
/// # Safety
/// `attrs` must be the frame's valid attributes.
unsafe fn attributes(attrs: &Attrs) -> Result<Vec<(String, Attr)>, InvalidArgument> {
    let mut out = Vec::new();
    for i in 0..usize::try_from(attrs.size).unwrap_or(0) {
        // SAFETY: XLA's arrays hold `size` entries; names are byte spans.
        let (kind, name, value) = unsafe {
            (
                *attrs.types.add(i),
                &**attrs.names.add(i),
                *attrs.attrs.add(i),
            )
        };
        // SAFETY: XLA's byte span.
        let name = String::from_utf8_lossy(unsafe { span_bytes(name) }).into_owned();
        let attr = match kind {
            ATTR_SCALAR => {
                // SAFETY: a scalar attribute points at an XLA_FFI_Scalar.
                let scalar = unsafe { &*value.cast::<Scalar>() };
                // SAFETY: the scalar's value has its dtype.
                let number = unsafe { read_scalar(scalar.dtype, scalar.value) };
                Attr::Number(number.ok_or_else(|| {
                    invalid(
                        &name,
                        format!("has unsupported dtype {}", dtype_name(scalar.dtype)),
                    )
                })?)
            }
            ATTR_STRING => {
                // SAFETY: a string attribute points at a byte span, XLA's.
                let bytes = unsafe { span_bytes(&*value.cast::<ByteSpan>()) };
                Attr::Text(String::from_utf8_lossy(bytes).into_owned())
            }
            _ => return Err(invalid(&name, "must be a scalar or a string attribute")),
        };
        out.push((name, attr));
    }
    Ok(out)
}

/// # Safety
/// `span` must hold `len` readable bytes at `ptr` (or be empty).
unsafe fn span_bytes(span: &ByteSpan) -> &[u8] {
    if span.len == 0 || span.ptr.is_null() {
        return &[]; // an empty span may have no address
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(span.ptr.cast::<u8>(), span.len) }
}

fn number(attrs: &[(String, Attr)], name: &str) -> Result<f64, InvalidArgument> {
    match attrs.iter().find(|(n, _)| n == name) {
        Some((_, Attr::Number(x))) => Ok(*x),
        Some(_) => Err(invalid(name, "must be a number")),
        None => Err(invalid(name, "is missing")),
    }
}

fn text<'a>(attrs: &'a [(String, Attr)], name: &str) -> Result<Option<&'a str>, InvalidArgument> {
    match attrs.iter().find(|(n, _)| n == name) {
        Some((_, Attr::Text(s))) => Ok(Some(s)),
        Some(_) => Err(invalid(name, "must be a string")),
        None => Ok(None),
    }
}

/// The step's hyperparameters, from the scalar operands and the attributes.
///
/// # Safety
/// `frame` must be valid.
unsafe fn hyperparams(
    frame: &CallFrame,
    attrs: &[(String, Attr)],
) -> Result<Hyperparams, InvalidArgument> {
    // SAFETY: the caller's contract.
    let (step, learning_rate, weight_decay) = unsafe {
        (
            scalar_operand(&frame.args, 0, "step")?,
            scalar_operand(&frame.args, 1, "learning_rate")?,
            scalar_operand(&frame.args, 2, "weight_decay")?,
        )
    };
    if !(step >= 1.0 && step.fract() == 0.0 && step < u64::MAX as f64) {
        return Err(invalid(
            "step",
            format!("must be an integer >= 1, got {step}"),
        ));
    }
    let required = |name| text(attrs, name)?.ok_or_else(|| invalid(name, "is missing"));
    Ok(Hyperparams {
        step: step as u64,
        learning_rate,
        beta_1: number(attrs, "beta_1")?,
        beta_2: number(attrs, "beta_2")?,
        epsilon: number(attrs, "epsilon")?,
        weight_decay,
        epsilon_mode: EpsilonMode::parse(required("epsilon_mode")?)?,
        weight_decay_mode: DecayMode::parse(required("weight_decay_mode")?)?,
        decay_form: text(attrs, "decay_form")?
            .map(DecayForm::parse)
            .transpose()?,
        maximize: number(attrs, "maximize")? != 0.0,
        grad_scale: None,
    })
}

const WRITTEN_LISTS: [&str; 4] = ["params", "exp_avgs", "exp_avg_sqs", "amsgrad_max"];
const COPIES: usize = 4; // the list index of param_copies, in messages

fn flag(attrs: &[(String, Attr)], name: &str) -> Result<bool, InvalidArgument> {
    match attrs.iter().any(|(n, _)| n == name) {
        true => Ok(number(attrs, name)? != 0.0),
        false => Ok(false),
    }
}

/// One tensor's buffer of a written list: XLA's operand and result, or host state's.
enum Slot {
    Xla(Tensor, Tensor),
    Held(Held),
}

/// # Safety
/// `frame` must be valid.
unsafe fn execute(frame: &CallFrame) -> Result<(), InvalidArgument> {
    if frame.struct_size < offset_of!(CallFrame, attrs) + size_of::<Attrs>() {
        return Err(invalid("call frame", "is older than XLA FFI API 0.1"));
    }
    if frame.stage != STAGE_EXECUTE {
        return Err(invalid(
            "stage",
            format!("must be execute ({STAGE_EXECUTE}), got {}", frame.stage),
        ));
    }
    let operands = usize::try_from(frame.args.size).unwrap_or(0);
    let results = usize::try_from(frame.rets.size).unwrap_or(0);
    // SAFETY: the caller's contract.
    let attrs = unsafe { attributes(&frame.attrs)? };
    // The written lists: params, exp_avgs, exp_avg_sqs and, with AMSGrad, amsgrad_max.
    let lists = if number(&attrs, "amsgrad")? != 0.0 {
        4
    } else {
        3
    };
    let copies = flag(&attrs, "param_copies")?;
    let stochastic = flag(&attrs, "stochastic")?;
    let by_reference = flag(&attrs, "host_state")?;
    let scalars = 3 + usize::from(stochastic) + usize::from(by_reference);
    // With `host_state`, the state lists are registered host buffers, not
    // operands, named by the last scalar: an operand, so that each device of a
    // sharded step can name its own shard's state.
    let host_state = match by_reference {
        false => None,
        true => {
            // SAFETY: the caller's contract (the scalar operands were counted).
            let id = unsafe { scalar_operand(&frame.args, scalars - 1, "host_state")? };
            let state = host_state::lookup(id as u64)
                .filter(|_| id >= 0.0 && id.fract() == 0.0)
                .ok_or_else(|| {
                    invalid(
                        "host_state",
                        format!("{id} is not registered (its HostState was freed)"),
                    )
                })?;
            if state.lists.len() != lists - 1 {
                return Err(invalid(
                    "host_state",
                    format!(
                        "has {} state lists where amsgrad={} needs {}",
                        state.lists.len(),
                        lists == 4,
                        lists - 1
                    ),
                ));
            }
            if state.masters.is_some() && copies {
                return Err(invalid(
                    "param_copies",
                    "must not be set with host_state's masters: the params are their copies",
                ));
            }
            Some(state)
        }
    };
    // With host masters, the params operands are 16-bit and only their results are written.
    let host_masters = host_state.as_ref().is_some_and(|s| s.masters.is_some());
    let (operand_lists, result_lists) = match host_state {
        Some(_) => (2, 1),
        None => (lists + 1, lists),
    };
    let (operand_lists, result_lists) = (
        operand_lists + usize::from(copies),
        result_lists + usize::from(copies),
    );
    let n = results / result_lists;
    if n == 0 || results != n * result_lists || operands != scalars + n * operand_lists {
        return Err(invalid(
            "operands",
            format!(
                "must be {scalars} scalars then n buffers each of params, grads{}{}, and \
                 the results n buffers of each written list; got {operands} operands \
                 and {results} results",
                match (&host_state, lists) {
                    (Some(_), _) => "",
                    (None, 4) => ", exp_avgs, exp_avg_sqs, amsgrad_max",
                    (None, _) => ", exp_avgs, exp_avg_sqs",
                },
                if copies { ", param_copies" } else { "" }
            ),
        ));
    }
    // SAFETY: the caller's contract (the scalar operands were counted).
    let hyperparams = unsafe { hyperparams(frame, &attrs)? };
    let rounding = match stochastic {
        false => Rounding::Nearest,
        true => {
            // SAFETY: as above.
            let seed = unsafe { scalar_operand(&frame.args, 3, "seed")? };
            if !(seed >= 0.0 && seed.fract() == 0.0 && seed < u64::MAX as f64) {
                return Err(invalid(
                    "seed",
                    format!("must be an integer >= 0, got {seed}"),
                ));
            }
            Rounding::Stochastic {
                seed: seed as u64,
                step: hyperparams.step,
            }
        }
    };
    let constants = hyperparams.constants()?;
    let level = simd::active_level()?;

    // Operand lists in order: params, grads, then the written state lists.
    let operand_index = |list: usize, i: usize| scalars + list * n + i;
    let mut grads = Vec::with_capacity(n);
    let mut written: Vec<Vec<Slot>> = (0..lists).map(|_| Vec::with_capacity(n)).collect();
    let mut param_copies = Vec::with_capacity(if copies || host_masters { n } else { 0 });
    for i in 0..n {
        // SAFETY: indices are within the counted sizes.
        let (params, grad) = unsafe {
            (
                tensor(
                    &frame.args,
                    operand_index(0, i),
                    &format!("params[{i}]"),
                    if host_masters { HALVES } else { FLOATS },
                )?,
                tensor(
                    &frame.args,
                    operand_index(1, i),
                    &format!("grads[{i}]"),
                    FLOATS,
                )?,
            )
        };
        let same_shape = |t: &Tensor, label: String| match t.dims == params.dims {
            true => Ok(()),
            false => Err(invalid(
                label,
                format!(
                    "has shape {:?} where params[{i}] has {:?}",
                    t.dims, params.dims
                ),
            )),
        };
        same_shape(&grad, format!("grads[{i}]"))?;
        if let Some(state) = &host_state {
            for (name, list) in state.named_lists(&WRITTEN_LISTS[1..lists]) {
                match list.get(i) {
                    Some(held) if list.len() == n && held.len == params.len => {}
                    held => {
                        return Err(invalid(
                            format!("host_state's {name}[{i}]"),
                            format!(
                                "holds {} elements in a list of {} where params[{i}] \
                                 holds {} in a list of {n}",
                                held.map_or(0, |h| h.len),
                                list.len(),
                                params.len
                            ),
                        ))
                    }
                }
            }
        }
        for (list, name) in WRITTEN_LISTS[..lists].iter().enumerate() {
            let label = format!("{name}[{i}]");
            // Host state holds the state lists, and the params too where it has masters.
            let held = match (&host_state, list) {
                (Some(state), 0) => state.masters.as_ref().map(|masters| masters[i]),
                (Some(state), _) => Some(state.lists[list - 1][i]),
                (None, _) => None,
            };
            if let Some(held) = held {
                written[list].push(Slot::Held(held));
                continue;
            }
            let (operand, allowed) = match list {
                0 => (operand_index(0, i), FLOATS),
                _ => (operand_index(list + 1, i), STATE),
            };
            // SAFETY: indices are within the counted sizes.
            let (input, result) = unsafe {
                (
                    tensor(&frame.args, operand, &label, allowed)?,
                    tensor(&frame.rets, list * n + i, &label, allowed)?,
                )
            };
            same_shape(&input, label.clone())?;
            same_shape(&result, label.clone())?;
            if input.dtype != result.dtype {
                return Err(invalid(
                    label,
                    format!(
                        "is {} but its result is {}",
                        input.dtype.name(),
                        result.dtype.name()
                    ),
                ));
            }
            written[list].push(Slot::Xla(input, result));
        }
        if copies || host_masters {
            let label = format!("param_copies[{i}]");
            let index = if host_masters {
                i
            } else {
                (result_lists - 1) * n + i
            };
            // SAFETY: indices are within the counted sizes.
            let copy = unsafe { tensor(&frame.rets, index, &label, HALVES)? };
            same_shape(&copy, label.clone())?;
            if host_masters && copy.dtype != params.dtype {
                return Err(invalid(
                    label,
                    format!(
                        "is {} where params[{i}] is {}",
                        copy.dtype.name(),
                        params.dtype.name()
                    ),
                ));
            }
            param_copies.push(copy);
        }
        grads.push(grad);
    }

    // Results are written; grads and any input XLA did not alias are read.
    let region = |t: &Tensor, written: bool, label: (usize, usize)| Region {
        start: t.data as usize,
        len_bytes: t.bytes(),
        written,
        label,
    };
    let mut regions: Vec<Region<(usize, usize)>> = grads
        .iter()
        .enumerate()
        .map(|(i, g)| region(g, false, (usize::MAX, i)))
        .collect();
    for (list, slots) in written.iter().enumerate() {
        for (i, slot) in slots.iter().enumerate() {
            match slot {
                Slot::Xla(input, result) => {
                    regions.push(region(result, true, (list, i)));
                    if input.data != result.data {
                        regions.push(region(input, false, (list, i)));
                    }
                }
                Slot::Held(held) => regions.extend(held.regions((list, i))),
            }
        }
    }
    regions.extend(
        param_copies
            .iter()
            .enumerate()
            .map(|(i, c)| region(c, true, (COPIES, i))),
    );
    if let Some((a, b)) = find_overlap(&regions) {
        let name = |(list, i): (usize, usize)| match list {
            usize::MAX => format!("grads[{i}]"),
            COPIES => format!("param_copies[{i}]"),
            _ => format!("{}[{i}]", WRITTEN_LISTS[list]),
        };
        return Err(invalid(name(b), format!("shares memory with {}", name(a))));
    }

    let _claim = in_flight::claim(&regions);
    // Checked: every result is a distinct buffer of its params' length and its input's dtype.
    let mut columns = written.into_iter().map(|slots| {
        slots.into_iter().map(|slot| match slot {
            Slot::Xla(input, result) => {
                if input.data != result.data && result.len > 0 {
                    // SAFETY: both buffers hold `bytes()` bytes and do not overlap (checked).
                    unsafe {
                        std::ptr::copy_nonoverlapping(input.data, result.data, result.bytes())
                    };
                }
                // SAFETY: XLA's buffer for the call; no other buffer overlaps it (checked).
                unsafe { Elements::from_raw(result.dtype, result.data, result.len) }
            }
            // SAFETY: registered state, kept alive by `host_state`; it overlaps
            // nothing else in the call (checked) and no other call (claimed).
            Slot::Held(held) => unsafe { held.elements() },
        })
    });
    let params = columns.next().expect("params");
    let exp_avgs = columns.next().expect("exp_avgs");
    let exp_avg_sqs = columns.next().expect("exp_avg_sqs");
    let mut amsgrad_max = columns.next();
    let mut param_copies = param_copies.iter().map(|c| {
        // SAFETY: XLA's buffer for the call; no other buffer overlaps it (checked).
        unsafe { Elements::from_raw(c.dtype, c.data, c.len) }
    });
    let tensors = params
        // SAFETY: XLA's buffers for the call; none overlaps a result (checked).
        .zip(
            grads
                .iter()
                .map(|g| unsafe { ElementsRef::from_raw(g.dtype, g.data, g.len) }),
        )
        .zip(exp_avgs)
        .zip(exp_avg_sqs)
        .enumerate()
        .map(|(i, (((p, g), m), v))| {
            let max_v = amsgrad_max.as_mut().and_then(Iterator::next);
            let t = TensorSlices::of_elements(p, g, m, v, max_v)?.at_tensor(i);
            match param_copies.next() {
                Some(copy) => t.with_param_copy(copy),
                None => Ok(t),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    parallel::adamw_step(tensors, &constants, rounding, level);
    Ok(())
}
