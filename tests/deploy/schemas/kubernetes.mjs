// Checks every object in a folder of Kubernetes manifests against the API
// schemas of Kubernetes (kubernetes-models) and the Prometheus Operator:
//   1. the OpenAPI validation the API server runs (types, required fields,
//      formats), through the packages' compiled validators;
//   2. no unknown field anywhere, as `kubectl apply --validate=strict` would
//      refuse: each object becomes a typed TypeScript literal, and tsc
//      rejects a property its interface does not declare.
// Before trusting a pass, it shows that both checks refuse a broken copy.
//
//   node kubernetes.mjs NODE_MODULES MANIFEST_DIR WORK_DIR
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

import { report, requireCaught, typeCheck } from './typecheck.mjs';

const [modules, manifestDir, workDir] = process.argv.slice(2);
if (!workDir) {
  console.error('usage: node kubernetes.mjs NODE_MODULES MANIFEST_DIR WORK_DIR');
  process.exit(2);
}
const { default: YAML } = await import(pathToFileURL(path.join(modules, 'yaml/dist/index.js')));

// apiVersion -> folder of the package that models it.
const packages = {
  'v1': 'kubernetes-models/v1',
  'apps/v1': 'kubernetes-models/apps/v1',
  'networking.k8s.io/v1': 'kubernetes-models/networking.k8s.io/v1',
  'monitoring.coreos.com/v1': '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1',
};

function modelFile(object) {
  const folder = packages[object.apiVersion];
  if (!folder) throw new Error(`no schema for apiVersion ${object.apiVersion}`);
  const file = path.join(modules, folder, `${object.kind}.js`);
  if (!fs.existsSync(file)) throw new Error(`no schema for kind ${object.kind} in ${object.apiVersion}`);
  return file;
}

function loadObjects(dir) {
  const objects = [];
  for (const file of fs.readdirSync(dir).filter((f) => f.endsWith('.yaml')).sort()) {
    for (const doc of YAML.parseAllDocuments(fs.readFileSync(path.join(dir, file), 'utf8'))) {
      if (doc.errors.length) throw new Error(`${file}: ${doc.errors[0].message}`);
      const object = doc.toJS();
      if (!object || object.kind === 'Kustomization') continue;
      objects.push({ file, object, name: `${file}: ${object.kind} ${object.metadata?.name}` });
    }
  }
  return objects;
}

// The API server's validation; one message per object it refuses.
async function validateAgainstOpenApi(objects) {
  const problems = [];
  for (const { object, name } of objects) {
    try {
      const model = (await import(pathToFileURL(modelFile(object))))[object.kind];
      new model(object).validate();
    } catch (error) {
      problems.push(`${name}: ${error.message}`);
    }
  }
  return problems;
}

// Unknown fields: tsc over typed literals; its error lines.
function findUnknownFields(objects, dir) {
  let source = '';
  objects.forEach(({ object, name }, i) => {
    source += `import type { I${object.kind} as T${i} } from ${JSON.stringify(modelFile(object))};\n`;
    source += `// ${name}\nexport const object${i}: T${i} = ${JSON.stringify(object, null, 1)};\n`;
  });
  return typeCheck(modules, dir, source);
}

async function check(objects, dir) {
  return [...await validateAgainstOpenApi(objects), ...findUnknownFields(objects, dir)];
}

const objects = loadObjects(manifestDir);
if (objects.length === 0) {
  console.error(`no manifests in ${manifestDir}`);
  process.exit(1);
}

// A broken copy first: a wrong type and an unknown field must each be caught.
const broken = structuredClone(objects);
const workload = broken.find(({ object }) => object.spec?.template?.spec?.containers);
workload.object.spec.replicas = 'two';
workload.object.spec.template.spec.containers[0].livenessProbes = {};
requireCaught(await check(broken, path.join(workDir, 'broken')),
              { 'wrong type': 'replicas', 'unknown field': 'livenessProbes' });

const problems = await check(objects, path.join(workDir, 'manifests'));
for (const { name } of objects) console.log(`checked ${name}`);
report(problems, manifestDir,
       `${objects.length} objects match the Kubernetes and Prometheus Operator schemas, no unknown fields`);
