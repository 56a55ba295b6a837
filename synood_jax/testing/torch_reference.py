"""PyTorch references with no JAX in them: torchvision's Bottleneck ResNet (state-dict keys exactly
torchvision's; torchvision itself breaks beside this torch), its classifier transforms, and the official
SynOOD refinement loop. Shared by the tests and the benchmarks, whose PyTorch side must not pay for
importing JAX."""
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)

# ----------------------------------------------------------------------------------------------
# Reference: torchvision.models.resnet (Bottleneck, v1.5), reduced to what the state dict needs.


class TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class TorchResNet(nn.Module):

  def __init__(self, layers=(3, 4, 6, 3), width=64, num_classes=1000):
    super().__init__()
    self.inplanes = width
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    self.layer1 = self._make_layer(width, layers[0])
    self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
    self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
    self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(width * 8 * 4, num_classes)

  def _make_layer(self, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * 4:
      downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
    layers = [TorchBottleneck(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * 4
    layers += [TorchBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def random_resnet(layers, width, num_classes, seed):
  torch.manual_seed(seed)
  model = TorchResNet(layers, width, num_classes)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
        m.num_batches_tracked.fill_(7)
    for block in model.modules():  # keep the residual stream from blowing up over 16 blocks
      if isinstance(block, TorchBottleneck):
        block.bn3.weight.mul_(0.3)
  return model.eval()


def torch_preprocess(x_nchw, resize=232, crop=224):
  h, w = x_nchw.shape[-2:]
  if w <= h:
    nh, nw = int(resize * h / w), resize
  else:
    nh, nw = resize, int(resize * w / h)
  y = F.interpolate(x_nchw, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
  top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
  y = y[..., top:top + crop, left:left + crop]
  mean = torch.tensor(IMAGENET_MEAN, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
  return (y - mean) / std


def official_loop(pipe, resnet_model, z_in, eps, masked, prompts, iterations, step_size, target, steps=20,
                  strength=0.6, guidance=8.0, resize=232, crop=224, teacher=None):
  """`generate_near_ood_sample.py`'s loop in PyTorch, on diffusers' StableDiffusionInpaintPipeline (which
  agrees with the official modified pipeline given identical latents). Per iteration: restart from
  add_noise(z_in, eps, t0); sample to z0 without gradient; u = z0 / scaling_factor (or the latents_mean /
  latents_std form) becomes the leaf; x = clamp(D(u) / 2 + 0.5); ResNet-50 transforms (resize 232,
  crop 224, normalize); s = mean(g) - logsumexp(g); L = mean_batch((m - s)^2); eps <- eps - r dL/du.

  z_in, eps, masked: NCHW tensors (posterior-sampled source latents, noise, 4-channel masked-image
  latents). teacher: an optional list of eps to start each iteration from (teacher forcing).
  Returns per iteration {'eps': eps fed in, 'update': r dL/du, 'scores': s, 'images': x}.
  """
  b, _, h, w = z_in.shape
  image = h * pipe.vae_scale_factor
  like = dict(device=z_in.device, dtype=z_in.dtype)
  pipe.scheduler.set_timesteps(steps, device=z_in.device)
  timesteps, _ = pipe.get_timesteps(steps, strength, z_in.device)
  cfg = pipe.vae.config
  out = []
  for i in range(iterations):
    if teacher is not None:
      eps = teacher[i]
    noise_latents = pipe.scheduler.add_noise(z_in, eps, timesteps[:1])
    with torch.no_grad():
      latents = pipe(prompt=prompts, image=torch.zeros(b, 3, image, image, **like),
                     mask_image=torch.ones(b, 1, image, image, **like), masked_image_latents=masked,
                     latents=noise_latents, guidance_scale=guidance, num_inference_steps=steps, strength=strength,
                     output_type="latent", height=image, width=image).images
      if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean, **like).view(1, 4, 1, 1)
        std = torch.tensor(cfg.latents_std, **like).view(1, 4, 1, 1)
        latents = latents * std / cfg.scaling_factor + mean
      else:
        latents = latents / cfg.scaling_factor
    with torch.enable_grad():
      latents.requires_grad_(True)
      x = (pipe.vae.decode(latents, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
      # resized in float32 (a no-op cast at float32; CPU torch has no half-precision antialiased resize)
      logits = resnet_model(torch_preprocess(x.float(), resize, crop).to(x.dtype))
      s = logits.mean(1) - torch.logsumexp(logits, dim=1)
      loss = torch.pow(target - s, 2).mean()
      loss.backward()
    update = latents.grad * step_size
    out.append(dict(eps=eps, update=update, scores=s.detach(), images=x.detach()))
    eps = eps - update
  return out
