// Bundles main.js with its dependencies into dist/, next to a copy of
// index.html, so that any static file server can serve dist/ as it is.
import { copyFile, mkdir } from 'node:fs/promises'
import * as esbuild from 'esbuild'

await mkdir('dist', { recursive: true })
await esbuild.build({
  entryPoints: ['main.js'],
  outdir: 'dist',
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: 'es2022',
  minify: true,
  sourcemap: true,
  logLevel: 'warning'
})
await copyFile('index.html', 'dist/index.html')
