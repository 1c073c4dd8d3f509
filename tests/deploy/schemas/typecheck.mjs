// Type-checks generated TypeScript with the pinned tsc: the checks in this
// folder write each deployment file as a typed literal, so that tsc refuses
// a field its API type does not declare, or a value of the wrong type.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

// Writes `source` as DIR/checked.ts and runs tsc on it; tsc's error lines.
export function typeCheck(modules, dir, source) {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'checked.ts'), source);
  fs.writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify({
    compilerOptions: {
      strict: true, noEmit: true, skipLibCheck: true, target: 'es2022',
      module: 'nodenext', moduleResolution: 'nodenext', types: [],
      // Bare imports resolve in the installed packages, wherever DIR is.
      baseUrl: '.', paths: { '*': [path.join(modules, '*')] },
    },
    files: ['checked.ts'],
  }));
  try {
    execFileSync(process.execPath, [path.join(modules, 'typescript/bin/tsc'), '-p', dir],
                 { encoding: 'utf8', stdio: 'pipe' });
    return [];
  } catch (error) {
    const lines = `${error.stdout}${error.stderr}`.split('\n').filter((l) => l.includes('error TS'));
    return lines.length ? lines : [`tsc failed: ${error.message}`];
  }
}
