//! Validation of a parsed spec: names, references, the step graph (a DAG, in a
//! topological order), limits; every refusal located in the source.

use super::*;

impl Checker<'_> {
    pub(super) fn err(&self, path: Vec<Seg>, kind: SpecErrorKind) -> SpecError {
        let at = locate(self.src, &path);
        SpecError {
            line: at.map(|a| a.0),
            column: at.map(|a| a.1),
            path: path_string(&path),
            kind,
        }
    }

    pub(super) fn duration(&self, path: Vec<Seg>, s: &str) -> Result<Duration, SpecError> {
        parse_duration(s).map_err(|e| self.err(path, e.into()))
    }

    pub(super) fn check(&self) -> Result<Workflow, SpecError> {
        if self.src.len() > self.limits.max_spec_bytes {
            return Err(SpecError {
                line: None,
                column: None,
                path: String::new(),
                kind: SpecErrorKind::TooLarge {
                    size: self.src.len(),
                    limit: self.limits.max_spec_bytes,
                },
            });
        }
        let raw: RawSpec = serde_yaml::from_str(self.src).map_err(yaml_error)?;
        if raw.api_version != API_VERSION {
            return Err(self.err(
                path!["apiVersion"],
                SpecErrorKind::WrongValue {
                    expected: API_VERSION,
                    found: raw.api_version,
                },
            ));
        }
        if raw.kind != KIND {
            return Err(self.err(
                path!["kind"],
                SpecErrorKind::WrongValue {
                    expected: KIND,
                    found: raw.kind,
                },
            ));
        }
        if !valid_name(&raw.metadata.name, 63) {
            return Err(self.err(
                path!["metadata", "name"],
                SpecErrorKind::BadName {
                    name: raw.metadata.name,
                    rule: NAME_RULE_63,
                },
            ));
        }
        for (section, dup) in [
            ("inputs", raw.inputs.duplicate()),
            ("agents", raw.agents.duplicate()),
        ] {
            if let Some(key) = dup {
                return Err(self.err(
                    vec![Seg::from(section), Seg::KeyNth(key.to_owned(), 1)],
                    SpecErrorKind::DuplicateKey {
                        key: key.to_owned(),
                    },
                ));
            }
        }
        let mut inputs = BTreeMap::new();
        for (name, input) in raw.inputs.0 {
            if !valid_input_name(&name) {
                return Err(self.err(
                    path!["inputs", name.as_str()],
                    SpecErrorKind::BadName {
                        name,
                        rule: INPUT_RULE,
                    },
                ));
            }
            let (default, description) = input.map_or((None, None), |i| (i.default, i.description));
            inputs.insert(
                name,
                InputSpec {
                    default,
                    description,
                },
            );
        }
        let mut agents = BTreeMap::new();
        for (name, a) in raw.agents.0 {
            let at = |field: &str| path!["agents", name.as_str(), field];
            if !valid_name(&name, 40) {
                return Err(self.err(
                    path!["agents", name.as_str()],
                    SpecErrorKind::BadName {
                        name,
                        rule: NAME_RULE_40,
                    },
                ));
            }
            let image = a.image.unwrap_or_else(|| "default".to_owned());
            if image.is_empty() || image.len() > 255 {
                return Err(self.err(
                    at("image"),
                    SpecErrorKind::OutOfRange {
                        value: format!("{:?}", image),
                        range: "1-255 characters".into(),
                    },
                ));
            }
            if a.model.is_empty() || a.model.len() > 255 {
                return Err(self.err(
                    at("model"),
                    SpecErrorKind::OutOfRange {
                        value: format!("{:?}", a.model),
                        range: "1-255 characters".into(),
                    },
                ));
            }
            let mem_mib = a.mem_mib.unwrap_or(512);
            if !(64..=1 << 20).contains(&mem_mib) {
                return Err(self.err(
                    at("mem_mib"),
                    SpecErrorKind::OutOfRange {
                        value: mem_mib.to_string(),
                        range: "64-1048576".into(),
                    },
                ));
            }
            if a.budget_tokens == Some(0) {
                return Err(self.err(
                    at("budget_tokens"),
                    SpecErrorKind::OutOfRange {
                        value: "0".into(),
                        range: "at least 1".into(),
                    },
                ));
            }
            agents.insert(
                name,
                AgentSpec {
                    image,
                    model: a.model,
                    mem_mib,
                    budget_tokens: a.budget_tokens,
                    vm: a.vm.unwrap_or(VmMode::Fresh),
                },
            );
        }

        // Count first: a huge spec is refused before any per-step work.
        if raw.steps.len() > self.limits.max_steps {
            return Err(self.err(
                path!["steps", self.limits.max_steps],
                SpecErrorKind::TooManySteps {
                    count: raw.steps.len(),
                    limit: self.limits.max_steps,
                },
            ));
        }
        let mut index: HashMap<String, usize> = HashMap::with_capacity(raw.steps.len());
        for (i, s) in raw.steps.iter().enumerate() {
            if !valid_name(&s.id, 63) {
                return Err(self.err(
                    path!["steps", i, "id"],
                    SpecErrorKind::BadName {
                        name: s.id.clone(),
                        rule: NAME_RULE_63,
                    },
                ));
            }
            if let Some(&first) = index.get(&s.id) {
                return Err(self.err(
                    path!["steps", i, "id"],
                    SpecErrorKind::DuplicateStep {
                        id: s.id.clone(),
                        first,
                    },
                ));
            }
            index.insert(s.id.clone(), i);
        }
        let step_ids: Vec<String> = raw.steps.iter().map(|s| s.id.clone()).collect();
        let known_steps = || list(step_ids.iter());
        let unknown_step = |name: &str| SpecErrorKind::UnknownStep {
            name: name.to_owned(),
            known: known_steps(),
        };

        // Needs, then the DAG, then everything that reads other steps.
        let mut needs: Vec<Vec<usize>> = Vec::with_capacity(raw.steps.len());
        for (i, s) in raw.steps.iter().enumerate() {
            let mut n = Vec::new();
            for (j, name) in s.needs.iter().flatten().enumerate() {
                let Some(&k) = index.get(name) else {
                    return Err(self.err(path!["steps", i, "needs", j], unknown_step(name)));
                };
                if k == i {
                    return Err(self.err(
                        path!["steps", i, "needs", j],
                        SpecErrorKind::SelfNeed { id: name.clone() },
                    ));
                }
                if !n.contains(&k) {
                    n.push(k);
                }
            }
            needs.push(n);
        }
        let order = self.topo_order(&raw.steps, &needs)?;
        let mut rank = vec![0; raw.steps.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r;
        }
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); raw.steps.len()];
        for (i, n) in needs.iter().enumerate() {
            for &k in n {
                children[k].push(i);
            }
        }
        let reach = Reach { needs: &needs };

        let mut steps = Vec::with_capacity(raw.steps.len());
        for (i, s) in raw.steps.into_iter().enumerate() {
            steps.push(self.step(i, s, &index, &agents, &inputs, &reach, &known_steps)?);
        }
        Ok(Workflow {
            name: raw.metadata.name,
            inputs,
            agents,
            steps,
            index,
            needs,
            children,
            rank,
        })
    }

    /// A topological order (Kahn's, spec order among peers), or the cycle.
    fn topo_order(&self, steps: &[RawStep], needs: &[Vec<usize>]) -> Result<Vec<usize>, SpecError> {
        let n = steps.len();
        let mut pending: Vec<usize> = needs.iter().map(Vec::len).collect();
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, ns) in needs.iter().enumerate() {
            for &k in ns {
                children[k].push(i);
            }
        }
        let mut queue: VecDeque<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = queue.pop_front() {
            order.push(i);
            for &c in &children[i] {
                pending[c] -= 1;
                if pending[c] == 0 {
                    queue.push_back(c);
                }
            }
        }
        if order.len() == n {
            return Ok(order);
        }
        // Every step left over needs another one left over: walk those edges until a
        // step repeats.
        let Some(start) = (0..n).find(|&i| pending[i] > 0) else {
            return Ok(order);
        };
        let mut seen = vec![usize::MAX; n];
        let mut walk = Vec::new();
        let mut at = start;
        while seen[at] == usize::MAX {
            seen[at] = walk.len();
            walk.push(at);
            match needs[at].iter().find(|&&k| pending[k] > 0) {
                Some(&k) => at = k,
                None => break,
            }
        }
        let cycle = walk.get(seen[at]..).unwrap_or(&walk[..]).to_vec();
        let mut names: Vec<&str> = cycle.iter().map(|&i| steps[i].id.as_str()).collect();
        if let Some(first) = names.first().copied() {
            names.push(first);
        }
        let first = cycle.first().copied().unwrap_or(start);
        let next = cycle.get(1).copied().unwrap_or(first);
        let j = steps[first]
            .needs
            .iter()
            .flatten()
            .position(|n| *n == steps[next].id)
            .unwrap_or(0);
        Err(self.err(
            path!["steps", first, "needs", j],
            SpecErrorKind::Cycle {
                cycle: names.join(" -> "),
            },
        ))
    }
}

/// Answers "is `k` among the transitive needs of `i`?" over a validated DAG.
pub(super) struct Reach<'a> {
    needs: &'a [Vec<usize>],
}

impl Reach<'_> {
    pub(super) fn reaches(&self, i: usize, k: usize) -> bool {
        // Most reads are of direct needs.
        if self.needs[i].contains(&k) {
            return true;
        }
        let mut seen = vec![false; self.needs.len()];
        let mut stack: Vec<usize> = self.needs[i].clone();
        while let Some(x) = stack.pop() {
            if x == k {
                return true;
            }
            if std::mem::replace(&mut seen[x], true) {
                continue;
            }
            stack.extend(self.needs[x].iter().copied().filter(|&y| !seen[y]));
        }
        false
    }
}

/// A `serde_yaml` error as a [`SpecError`]: its location, its path, its message
/// without the ` at line N column M` suffix (the line leads the message instead).
fn yaml_error(e: serde_yaml::Error) -> SpecError {
    let loc = e.location();
    let mut msg = e.to_string();
    if let Some(l) = &loc {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(p) = msg.find(&suffix) {
            msg.replace_range(p..p + suffix.len(), "");
        }
    }
    // serde_yaml puts the path first ("steps[0]: unknown field …"); keep it as the path.
    let (path, message) = match msg.split_once(": ") {
        Some((p, m)) if !p.contains(' ') && loc.is_some() => (p.to_owned(), m.to_owned()),
        _ => (String::new(), msg),
    };
    SpecError {
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        path,
        kind: SpecErrorKind::Syntax { message },
    }
}
