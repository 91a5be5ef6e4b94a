//! An index over one ONNX graph: who produces and who consumes each value,
//! which values are constants, and an order in which the nodes can run.

use super::error::{OnnxError, Result};
use super::proto::{GraphProto, NodeProto, TensorProto};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

/// Where a value of the graph comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Output of the node at this index of `graph.node`.
    Node(usize),
    /// The initializer at this index of `graph.initializer`.
    Initializer(usize),
    /// The graph input at this index of `graph.input` (not backed by an initializer).
    Input(usize),
}

/// Producers, consumers, initializers and topological order of a graph.
#[derive(Clone, Debug)]
pub struct GraphIndex {
    producers: HashMap<String, Source>,
    consumers: HashMap<String, Vec<usize>>,
    order: Vec<usize>,
}

/// Names a subgraph reads from its enclosing scope (values it uses but does not define).
fn outer_scope_reads(g: &GraphProto, out: &mut HashSet<String>) {
    let mut defined: HashSet<&str> = g.input.iter().map(|v| v.name()).collect();
    defined.extend(g.initializer.iter().map(|t| t.name()));
    defined.extend(
        g.sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref())
            .map(|t| t.name()),
    );
    for n in &g.node {
        defined.extend(n.output.iter().map(String::as_str));
    }
    for n in &g.node {
        for i in n
            .input
            .iter()
            .filter(|i| !i.is_empty() && !defined.contains(i.as_str()))
        {
            out.insert(i.clone());
        }
        for sub in n
            .attribute
            .iter()
            .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
        {
            let mut inner = HashSet::new();
            outer_scope_reads(sub, &mut inner);
            out.extend(inner.into_iter().filter(|i| !defined.contains(i.as_str())));
        }
    }
}

/// The initializer called `name`, if the graph has one.
pub fn initializer<'a>(graph: &'a GraphProto, name: &str) -> Option<&'a TensorProto> {
    graph.initializer.iter().find(|t| t.name() == name)
}

/// Whether `name` is a constant: an initializer or a `Constant` node's output.
pub fn is_constant(graph: &GraphProto, name: &str) -> bool {
    initializer(graph, name).is_some()
        || graph
            .node
            .iter()
            .any(|n| n.op_type() == "Constant" && n.output.iter().any(|o| o == name))
}

/// The value of the constant `name`: an initializer or a `Constant` node's
/// `value`; `None` for anything computed.
pub fn constant_tensor(graph: &GraphProto, name: &str) -> Option<crate::tensor::Tensor> {
    if let Some(t) = initializer(graph, name) {
        return super::to_tensor(t).ok();
    }
    graph
        .node
        .iter()
        .find(|n| n.op_type() == "Constant" && n.output.first().is_some_and(|o| o == name))
        .and_then(|n| super::attr::find(n, "value"))
        .and_then(|a| a.t.as_ref())
        .and_then(|t| super::to_tensor(t).ok())
}

/// Input `input` of `node` as int64 values, when it is an int64 or int32
/// constant ([`constant_tensor`]): a shape, pads, sizes.
pub fn constant_ints(graph: &GraphProto, node: &NodeProto, input: usize) -> Option<Vec<i64>> {
    use crate::tensor::Tensor;
    let name = node.input.get(input).filter(|s| !s.is_empty())?;
    match constant_tensor(graph, name)? {
        Tensor::I64(a) => Some(a.iter().copied().collect()),
        Tensor::I32(a) => Some(a.iter().map(|&v| i64::from(v)).collect()),
        _ => None,
    }
}

/// Puts the nodes of `graph` in topological order (an error for a cycle).
pub fn sort_topologically(graph: &mut GraphProto) -> Result<()> {
    let order = GraphIndex::new(graph)?.topological_order().to_vec();
    let mut nodes: Vec<Option<NodeProto>> = std::mem::take(&mut graph.node)
        .into_iter()
        .map(Some)
        .collect();
    graph.node = order
        .into_iter()
        .map(|i| nodes[i].take().expect("each index once"))
        .collect();
    Ok(())
}

/// The initializer called `name` as float32 values: `None` when there is no
/// such initializer or it holds another element type.
pub fn initializer_f32(
    graph: &GraphProto,
    name: &str,
) -> Result<Option<ndarray::ArrayD<f32>>, OnnxError> {
    let Some(t) = initializer(graph, name) else {
        return Ok(None);
    };
    Ok(match super::to_tensor(t)? {
        crate::tensor::Tensor::F32(a) => Some(a),
        _ => None,
    })
}

/// Every value a node reads: its inputs plus what its subgraphs read from outside.
pub fn node_reads(node: &NodeProto) -> Vec<String> {
    let mut reads: Vec<String> = node
        .input
        .iter()
        .filter(|i| !i.is_empty())
        .cloned()
        .collect();
    let mut implicit = HashSet::new();
    for sub in node
        .attribute
        .iter()
        .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
    {
        outer_scope_reads(sub, &mut implicit);
    }
    let mut implicit: Vec<String> = implicit
        .into_iter()
        .filter(|i| !reads.contains(i))
        .collect();
    implicit.sort();
    reads.extend(implicit);
    reads
}

/// A readable label for a node: its name, else its op type and index.
pub fn node_label(graph: &GraphProto, index: usize) -> String {
    let n = &graph.node[index];
    if n.name().is_empty() {
        format!("#{index} ({})", n.op_type())
    } else {
        n.name().to_string()
    }
}

/// Gives every unnamed node the name `<op_type>_<index>` (made unique).
pub fn name_nodes(graph: &mut GraphProto) {
    let mut used: HashSet<String> = graph.node.iter().map(|n| n.name().to_string()).collect();
    for (i, n) in graph.node.iter_mut().enumerate() {
        if n.name().is_empty() {
            let mut name = format!("{}_{i}", n.op_type());
            while used.contains(&name) {
                name.push('_');
            }
            used.insert(name.clone());
            n.name = Some(name);
        }
    }
}

impl GraphIndex {
    /// Indexes `graph`, failing on a value with two producers or a cycle.
    pub fn new(graph: &GraphProto) -> Result<GraphIndex> {
        let gname = graph.name().to_string();
        let mut producers = HashMap::new();
        for (i, t) in graph.initializer.iter().enumerate() {
            producers.insert(t.name().to_string(), Source::Initializer(i));
        }
        for (i, v) in graph.input.iter().enumerate() {
            producers
                .entry(v.name().to_string())
                .or_insert(Source::Input(i));
        }
        let describe = |s: &Source| match *s {
            Source::Node(i) => format!("node '{}'", node_label(graph, i)),
            Source::Initializer(_) => "an initializer".to_string(),
            Source::Input(_) => "a graph input".to_string(),
        };
        for (i, n) in graph.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if let Some(prev) = producers.insert(o.clone(), Source::Node(i)) {
                    return Err(OnnxError::DuplicateProducer {
                        graph: gname,
                        value: o.clone(),
                        first: describe(&prev),
                        second: describe(&Source::Node(i)),
                    });
                }
            }
        }
        let reads: Vec<Vec<String>> = graph.node.iter().map(node_reads).collect();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in reads.iter().enumerate() {
            for v in r {
                let list = consumers.entry(v.clone()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        let order = topological_order(graph, &producers, &reads)?;
        Ok(GraphIndex {
            producers,
            consumers,
            order,
        })
    }

    /// Where `value` comes from, if anything in the graph defines it.
    pub fn producer(&self, value: &str) -> Option<Source> {
        self.producers.get(value).copied()
    }

    /// The index of the node producing `value`, if a node does.
    pub fn producer_node(&self, value: &str) -> Option<usize> {
        match self.producer(value) {
            Some(Source::Node(i)) => Some(i),
            _ => None,
        }
    }

    /// The indices of the nodes reading `value` (each once, in graph order).
    pub fn consumers(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The index in `graph.initializer` of `value`, if it is an initializer.
    pub fn initializer(&self, value: &str) -> Option<usize> {
        match self.producer(value) {
            Some(Source::Initializer(i)) => Some(i),
            _ => None,
        }
    }

    /// Node indices in an order where every node follows its producers;
    /// nodes already in order keep their relative order.
    pub fn topological_order(&self) -> &[usize] {
        &self.order
    }
}

fn topological_order(
    graph: &GraphProto,
    producers: &HashMap<String, Source>,
    reads: &[Vec<String>],
) -> Result<Vec<usize>> {
    let n = graph.node.len();
    let mut indegree = vec![0usize; n];
    let mut successors: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, r) in reads.iter().enumerate() {
        for v in r {
            if let Some(Source::Node(p)) = producers.get(v) {
                indegree[i] += 1;
                successors[*p].push(i);
            }
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &s in &successors[i] {
            indegree[s] -= 1;
            if indegree[s] == 0 {
                ready.push(Reverse(s));
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk back through unfinished producers until a node repeats: it lies on a cycle.
    let mut current = (0..n)
        .find(|&i| indegree[i] > 0)
        .expect("some node is unfinished");
    let mut seen = HashSet::new();
    while seen.insert(current) {
        current = reads[current]
            .iter()
            .find_map(|v| match producers.get(v) {
                Some(Source::Node(p)) if indegree[*p] > 0 => Some(*p),
                _ => None,
            })
            .unwrap_or(current);
    }
    Err(OnnxError::Cycle {
        graph: graph.name().to_string(),
        node: node_label(graph, current),
        op_type: graph.node[current].op_type().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{TensorProto, ValueInfoProto};

    fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            name: Some(name.into()),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn graph(nodes: Vec<NodeProto>) -> GraphProto {
        GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: vec![ValueInfoProto {
                name: Some("x".into()),
                ..Default::default()
            }],
            initializer: vec![TensorProto {
                name: Some("w".into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn orders_nodes_given_out_of_order() {
        let g = graph(vec![
            node("c", "Relu", &["b_out"], &["y"]),
            node("a", "Conv", &["x", "w"], &["a_out"]),
            node("b", "Relu", &["a_out"], &["b_out"]),
        ]);
        let idx = GraphIndex::new(&g).unwrap();
        assert_eq!(idx.topological_order(), &[1, 2, 0]);
        assert_eq!(idx.producer_node("a_out"), Some(1));
        assert_eq!(idx.consumers("a_out"), &[2]);
        assert_eq!(idx.consumers("x"), &[1]);
        assert_eq!(idx.initializer("w"), Some(0));
        assert_eq!(idx.producer("x"), Some(Source::Input(0)));
        assert_eq!(idx.producer("nothing"), None);
    }

    #[test]
    fn cycle_is_reported_with_a_node_on_it() {
        let g = graph(vec![
            node("head", "Relu", &["x"], &["h"]),
            node("p", "Add", &["h", "q_out"], &["p_out"]),
            node("q", "Relu", &["p_out"], &["q_out"]),
        ]);
        let msg = GraphIndex::new(&g).unwrap_err().to_string();
        assert!(
            msg.contains("cycle") && (msg.contains("'p'") || msg.contains("'q'")),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_producer_is_an_error() {
        let g = graph(vec![
            node("a", "Relu", &["x"], &["y"]),
            node("b", "Relu", &["x"], &["y"]),
        ]);
        let msg = GraphIndex::new(&g).unwrap_err().to_string();
        assert!(
            msg.contains("'y'") && msg.contains("'a'") && msg.contains("'b'"),
            "{msg}"
        );
    }

    #[test]
    fn subgraph_reads_order_their_node_after_the_producer() {
        let body = GraphProto {
            node: vec![node("inner", "Identity", &["late"], &["o"])],
            ..Default::default()
        };
        let mut iff = node("if", "If", &["x"], &["y"]);
        iff.attribute.push(crate::onnx::proto::AttributeProto {
            name: Some("then_branch".into()),
            g: Some(body),
            ..Default::default()
        });
        let g = graph(vec![iff, node("late", "Relu", &["x"], &["late"])]);
        let idx = GraphIndex::new(&g).unwrap();
        assert_eq!(idx.topological_order(), &[1, 0]);
        assert_eq!(idx.consumers("late"), &[0]);
    }
}
