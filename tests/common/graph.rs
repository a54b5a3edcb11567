//! What a captured CUDA graph holds: the function names of its kernel nodes, to show that an
//! op's kernels were queued on the stream being captured (tests/gpu.rs, tests/candle.rs).

use cudarc::driver::sys;
use std::ffi::{c_char, CStr};

/// The function names of `graph`'s kernel nodes (`se_pool_nchw_f32`, candle's `fill_f32`, ...).
pub fn kernel_names(graph: sys::CUgraph) -> Vec<String> {
    let mut n = 0usize;
    // SAFETY: graph is a live graph handle; a null node array asks for the count.
    unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n) }
        .result()
        .expect("cuGraphGetNodes");
    let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
    // SAFETY: nodes has room for n handles.
    unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n) }
        .result()
        .expect("cuGraphGetNodes");
    let mut out = Vec::new();
    for &node in &nodes[..n] {
        let mut ty = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
        // SAFETY: node belongs to graph.
        unsafe { sys::cuGraphNodeGetType(node, &mut ty) }
            .result()
            .expect("cuGraphNodeGetType");
        if ty != sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
            continue;
        }
        // SAFETY: an all-zero parameter block is a valid out-parameter (pointers and integers).
        let mut p: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
        // SAFETY: node is a kernel node of graph.
        unsafe { sys::cuGraphKernelNodeGetParams_v2(node, &mut p) }
            .result()
            .expect("cuGraphKernelNodeGetParams");
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: p.func is the node's function; the name lives as long as its module.
        let named = unsafe { sys::cuFuncGetName(&mut name, p.func) }.result();
        out.push(match named {
            Ok(()) if !name.is_null() => unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned(),
            _ => "<unnamed>".to_string(),
        });
    }
    out
}
