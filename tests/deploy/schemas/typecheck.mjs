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

// Exits unless every planted error was caught: `planted` maps a description
// to a text its error line contains.
export function requireCaught(caught, planted) {
  const missed = Object.entries(planted)
    .filter(([, text]) => !caught.some((line) => line.includes(text)))
    .map(([what]) => what);
  if (missed.length) {
    console.error(`the checks missed a planted error: ${missed.join(', ')}`);
    console.error(caught.join('\n'));
    process.exit(1);
  }
}

// Prints the problems found in `dir` and exits 1, or prints `passed`.
export function report(problems, dir, passed) {
  if (problems.length) {
    console.error(problems.join('\n'));
    console.error(`${problems.length} problem(s) in ${dir}`);
    process.exit(1);
  }
  console.log(passed);
}
