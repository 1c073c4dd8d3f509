// Checks every dashboard in a folder against Grafana's own dashboard schema
// (@grafana/schema, the types Grafana generates from its CUE schema): each
// dashboard is type-checked as a literal of `Dashboard`, so a field the
// schema does not declare (on the dashboard, a panel, a variable, a field
// config) or a value of the wrong type is refused. Before trusting a pass,
// it shows that a broken copy is refused.
//
//   node grafana.mjs NODE_MODULES DASHBOARD_DIR WORK_DIR
import fs from 'node:fs';
import path from 'node:path';

import { report, requireCaught, typeCheck } from './typecheck.mjs';

const [modules, dashboardDir, workDir] = process.argv.slice(2);
if (!workDir) {
  console.error('usage: node grafana.mjs NODE_MODULES DASHBOARD_DIR WORK_DIR');
  process.exit(2);
}

// The schema's enums hold the strings the JSON holds ("absolute" for
// ThresholdsMode.Absolute); every other type is taken as declared.
const prelude = `import type { Dashboard } from "@grafana/schema";
type AsJson<T> = T extends string ? \`\${T}\`
  : T extends (infer U)[] ? AsJson<U>[]
  : T extends object ? { [K in keyof T]: AsJson<T[K]> }
  : T;
`;

function check(dashboards, dir) {
  let source = prelude;
  dashboards.forEach(({ file, dashboard }, i) => {
    source += `// ${file}\nexport const dashboard${i}: AsJson<Dashboard> = ${JSON.stringify(dashboard, null, 1)};\n`;
  });
  return typeCheck(modules, dir, source);
}

const dashboards = fs.readdirSync(dashboardDir).filter((f) => f.endsWith('.json')).sort()
  .map((file) => ({ file, dashboard: JSON.parse(fs.readFileSync(path.join(dashboardDir, file), 'utf8')) }));
if (dashboards.length === 0) {
  console.error(`no dashboards in ${dashboardDir}`);
  process.exit(1);
}

// A broken copy first: a misspelt panel field, and a mistyped one in another
// dashboard (tsc reports one error per literal).
const broken = structuredClone(dashboards);
const firstPanel = (i) => broken[i % broken.length].dashboard.panels.find((p) => p.type !== 'row');
firstPanel(0).titel = firstPanel(0).title;
firstPanel(1).gridPos.w = 'wide';
requireCaught(check(broken, path.join(workDir, 'broken')), {
  'unknown field': 'titel',
  'wrong type': "'string' is not assignable to type 'number'",
});

const problems = check(dashboards, path.join(workDir, 'dashboards'));
for (const { file, dashboard } of dashboards) console.log(`checked ${file}: ${dashboard.panels.length} panels`);
report(problems, dashboardDir,
       `${dashboards.length} dashboards match @grafana/schema's Dashboard, no unknown fields`);
