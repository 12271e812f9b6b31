//! Patching an object's manifest where it lives in the repository (a
//! restore's hold on the Kustomization that owns a recreated cluster): a
//! JSON merge patch applied to the one YAML document that declares it.

use super::{documents, is_yaml, limits, strip_bom, Snapshot};

/// RFC 7386 JSON merge patch: objects merge, `null` removes, anything else replaces.
pub fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(Default::default());
    }
    if let Some(map) = target.as_object_mut() {
        for (k, v) in patch_map {
            if v.is_null() {
                map.remove(k);
            } else {
                json_merge(map.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
    }
}

/// Where an object's manifest is in the repository, and that file with the
/// merge patch applied to the object's document (the other documents keep
/// their text; the patched one is written anew, without its comments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchedFile {
    pub path: String,
    pub content: String,
    /// The document already says what the patch says.
    pub already: bool,
}

/// Finds the manifest of `kind` `namespace/name` in the YAML files of
/// `snapshot` and applies `merge` to it.
pub fn patch_manifest(
    snapshot: &Snapshot,
    kind: &str,
    namespace: &str,
    name: &str,
    merge: &serde_json::Value,
) -> Option<PatchedFile> {
    for (path, bytes) in snapshot.iter().filter(|(p, _)| is_yaml(p)) {
        let Ok(whole) = std::str::from_utf8(bytes) else {
            continue;
        };
        if limits::check_size(path, bytes.len()).is_err() {
            continue;
        }
        let text = strip_bom(whole);
        let bom = &whole[..whole.len() - text.len()];
        for doc in documents(text) {
            if limits::check_depth(path, doc.text, doc.first_line).is_err() {
                continue;
            }
            let Ok(value) = serde_yaml::from_str::<serde_json::Value>(doc.text) else {
                continue;
            };
            let matches = value["kind"] == kind
                && value["metadata"]["name"] == name
                && value["metadata"]["namespace"].as_str().is_none_or(|ns| ns == namespace);
            if !matches {
                continue;
            }
            let mut patched = value.clone();
            json_merge(&mut patched, merge);
            if patched == value {
                return Some(PatchedFile {
                    path: path.clone(),
                    content: whole.to_string(),
                    already: true,
                });
            }
            let Ok(mut yaml) = serde_yaml::to_string(&patched) else {
                return None;
            };
            if !yaml.ends_with('\n') {
                yaml.push('\n');
            }
            let start = doc.text.as_ptr() as usize - text.as_ptr() as usize;
            let end = start + doc.text.len();
            let content = format!("{bom}{}{yaml}{}", &text[..start], &text[end..]);
            return Some(PatchedFile {
                path: path.clone(),
                content,
                already: false,
            });
        }
    }
    None
}
