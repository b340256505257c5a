-- Argo CD health check for kubemaas.io/ModelService (docs/install.md, "GitOps", shows how to install
-- it; tests/unit/test_chart_gitops.py runs it against sample objects).
--   Healthy      Ready=True for the current generation, no canary in progress
--   Progressing  no status yet, the operator has not observed the current generation,
--                replicas are still rolling out (Ready=False, reason WaitingForReplicas),
--                or a canary is moving (Progressing=True, reason CanaryProgressing)
--   Suspended    a canary step held until the spec advances it (Progressing reason CanaryHeld)
--   Degraded     Degraded=True (unschedulable, image pull, crash, missing CRD, name conflict),
--                or Ready=False for any other reason (InvalidSpec, ...)
local hs = {}

local function find_condition(conditions, ctype)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function describe(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the KubeMaaS operator to report status"
  return hs
end

local generation = obj.metadata.generation
local conditions = obj.status.conditions
local ready = find_condition(conditions, "Ready")

-- The generation the status describes: the Ready condition's own, else the status's.
local observed = obj.status.observedGeneration
if ready ~= nil and ready.observedGeneration ~= nil then
  observed = ready.observedGeneration
end
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. string.format("%d", generation)
  return hs
end

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

local degraded = find_condition(conditions, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end

local progressing = find_condition(conditions, "Progressing")
if progressing ~= nil and progressing.status == "True" and progressing.reason == "CanaryHeld" then
  hs.status = "Suspended"
  hs.message = describe(progressing)
  return hs
end
if progressing ~= nil and progressing.status == "True" and progressing.reason == "CanaryProgressing" then
  hs.status = "Progressing"
  hs.message = describe(progressing)
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end

if ready.status == "Unknown" or ready.reason == "WaitingForReplicas" or ready.reason == "RollingOut" then
  hs.status = "Progressing"
  hs.message = describe(ready)
  return hs
end

hs.status = "Degraded"
hs.message = describe(ready)
return hs
