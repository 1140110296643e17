# syntax=docker/dockerfile:1
# Mantle: multi-stage build. The runtime image holds production dependencies and dist/ only,
# runs as a non-root user, and runs exactly what test/build/production.test.ts runs: node dist/server.js.

FROM node:24-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci
COPY . .
RUN npm run build

FROM node:24-bookworm-slim AS runtime
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=3000
WORKDIR /app
COPY package.json package-lock.json ./
# recheck (the manifest's pattern check) runs its pure JavaScript backend only: its Java and
# native backends, optional dependencies of 52 MB, are never run and not kept.
RUN npm ci --omit=dev && rm -rf node_modules/recheck-jar node_modules/recheck-linux-x64 && npm cache clean --force
COPY --from=build /app/dist ./dist
USER node
EXPOSE 3000
# No curl in the slim image: Node's own fetch asks /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.PORT || 3000) + '/healthz').then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
CMD ["node", "dist/server.js"]
